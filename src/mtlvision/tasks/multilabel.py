"""Multi-label image classification: any number of labels per image, binary cross-entropy, P/R/F1 and mAP."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import (
    MultilabelAccuracy,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)
from torchmetrics.functional.classification import multilabel_average_precision
from torchmetrics.utilities import dim_zero_cat

from mtlvision.errors import ConfigError
from mtlvision.tasks.base import TargetKind, Task, masked_mean, require
from mtlvision.tasks.collection import ValidSampleMetrics
from mtlvision.tasks.drawing import draw_text
from mtlvision.tasks.params import name_list, require_count
from mtlvision.tasks.registry import TASKS


class LabelAveragePrecision(Metric):
    """Exact average precision of each label from every (score, target) pair of the split.

    torchmetrics' ``MultilabelAveragePrecision`` keeps ``[N, C]`` states; under torch.distributed a process
    that saw no sample sends an empty 1-D state instead, and the gather of shapes breaks. Flat 1-D states
    gather from any process; the computation itself is torchmetrics'. Labels without a positive
    target in the split get NaN (they have no precision-recall curve).
    """

    full_state_update = False
    scores: list[Tensor]  # metric states (add_state): lists until synced, then torchmetrics' concatenation
    targets: list[Tensor]

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.scores.append(preds.float().flatten())
        self.targets.append(target.float().flatten())

    def compute(self) -> Tensor:
        scores = dim_zero_cat(self.scores).view(-1, self.num_labels)
        targets = dim_zero_cat(self.targets).view(-1, self.num_labels).to(torch.int64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No positive samples found in target")
            precision = multilabel_average_precision(scores, targets, self.num_labels, average="none", thresholds=None)
        return torch.where(targets.sum(dim=0) > 0, precision, torch.full_like(precision, float("nan")))


class MultiLabelMetric(ValidSampleMetrics):
    """Label-wise accuracy, exact match, macro precision/recall/F1 and mAP over the split (torchmetrics).

    - ``accuracy``: the fraction of correct (sample, label) decisions.
    - ``exact_match``: the fraction of samples whose whole label set is right.
    - ``precision``, ``recall``, ``f1``: per label, then averaged over every label (a label that is never
      present nor predicted scores 0, as in scikit-learn with ``zero_division=0``).
    - ``map``: the average precision of each label (exact, from every score of the split), averaged over
      the labels with at least one positive sample in the split; a label without positives has no
      precision-recall curve (the PASCAL VOC rule).
    """

    def __init__(self, num_labels: int, threshold: float) -> None:
        super().__init__(
            {
                "accuracy": MultilabelAccuracy(num_labels, threshold=threshold, average="micro"),
                "exact_match": MultilabelExactMatch(num_labels, threshold=threshold),
                "precision": MultilabelPrecision(num_labels, threshold=threshold, average="macro"),
                "recall": MultilabelRecall(num_labels, threshold=threshold, average="macro"),
                "f1": MultilabelF1Score(num_labels, threshold=threshold, average="macro"),
                "average_precision": LabelAveragePrecision(num_labels),
            },
            keys=MultiLabel.metric_directions,
        )

    def prepare(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        # Probabilities, so that torchmetrics never guesses whether the scores are logits.
        return prediction.float().sigmoid(), target.round().to(torch.int64)

    def summarise(self, values: dict[str, Tensor]) -> dict[str, float]:
        average_precision = values["average_precision"]
        scored = ~average_precision.isnan()
        summary = {key: float(values[key]) for key in ("accuracy", "exact_match", "precision", "recall", "f1")}
        summary["map"] = float(average_precision[scored].mean()) if bool(scored.any()) else float("nan")
        return summary


@TASKS.register("multilabel", "Multi-label image classification (binary cross-entropy; P/R/F1, mAP).")
class MultiLabel(Task):
    """Any subset of ``num_labels`` labels per image. The target is a float32 multi-hot ``[C]`` vector."""

    kind = "multilabel"
    target_kind = TargetKind.LABELS
    level = "image"
    default_head = "mlp"
    metric_directions: ClassVar[dict[str, bool]] = {
        "accuracy": True,
        "exact_match": True,
        "precision": True,
        "recall": True,
        "f1": True,
        "map": True,
    }
    primary_metric = "map"

    def __init__(
        self,
        name: str,
        num_labels: int,
        label_names: Sequence[str] | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(name)
        # torchmetrics' multi-label metrics need two labels; one binary label is a 2-class Classification.
        require_count(name, "num_labels", num_labels, 2)
        if not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"Task {name!r}: threshold must be in (0, 1), got {threshold!r}.")
        self.num_labels = num_labels
        self.label_names = name_list(name, "label_names", num_labels, label_names)
        self.threshold = float(threshold)

    @property
    def output_channels(self) -> int:
        return self.num_labels

    def loss(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        valid = valid.to(torch.bool)
        target = torch.where(valid[:, None], target.to(prediction.dtype), torch.zeros_like(prediction))
        per_label = F.binary_cross_entropy_with_logits(prediction, target, reduction="none")
        return masked_mean(per_label.mean(dim=1), valid)

    def metric(self) -> MultiLabelMetric:
        return MultiLabelMetric(self.num_labels, self.threshold)

    def placeholder_target(self, height: int, width: int) -> Tensor:
        return torch.zeros(self.num_labels, dtype=torch.float32)

    def check_target(self, target: Any, where: str) -> None:
        require(
            isinstance(target, Tensor),
            where,
            f"task {self.name!r}: the labels must be a tensor, got {type(target).__name__}.",
        )
        require(
            target.is_floating_point() and tuple(target.shape) == (self.num_labels,),
            where,
            f"task {self.name!r}: the labels must be a float vector of {self.num_labels} entries, got "
            f"{target.dtype} of shape {tuple(target.shape)}.",
        )
        off = target[(target != 0) & (target != 1)]
        require(
            off.numel() == 0,
            where,
            f"task {self.name!r}: the labels must be 0 or 1 (multi-hot), found {off[:5].tolist()}.",
        )

    def decode(self, prediction: Tensor) -> list[dict[str, Any]]:
        probabilities = prediction.detach().float().sigmoid().cpu()
        results = []
        for row in probabilities:
            scores = {name: float(p) for name, p in zip(self.label_names, row)}
            # Strictly above the threshold, as in the metrics.
            results.append({"labels": [n for n, p in scores.items() if p > self.threshold], "scores": scores})
        return results

    def draw(self, image: np.ndarray, decoded: dict[str, Any]) -> np.ndarray:
        lines = [f"{self.name}:"] + [f"{n} ({decoded['scores'][n]:.2f})" for n in decoded["labels"]]
        return draw_text(image, lines if decoded["labels"] else [f"{self.name}: (none)"])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "num_labels": self.num_labels,
            "label_names": list(self.label_names),
            "threshold": self.threshold,
        }
