"""Single-label image classification: one class per image, cross-entropy, accuracy and macro P/R/F1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from mtlvision.errors import ConfigError
from mtlvision.tasks.base import TargetKind, Task, masked_mean, require
from mtlvision.tasks.collection import ValidSampleMetrics
from mtlvision.tasks.drawing import draw_text
from mtlvision.tasks.params import name_list, require_count
from mtlvision.tasks.registry import TASKS


class ClassificationMetric(ValidSampleMetrics):
    """Micro accuracy and macro precision, recall and F1 over the split (torchmetrics).

    The macro averages run over the classes that occur in the targets or the predictions of the split
    (torchmetrics' rule, the same as scikit-learn's default labels); a class that never occurs has no
    precision or recall to average.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(
            {
                "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                "precision": MulticlassPrecision(num_classes, average="macro"),
                "recall": MulticlassRecall(num_classes, average="macro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            },
            keys=Classification.metric_directions,
        )

    def prepare(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return prediction.argmax(dim=1), target

    def summarise(self, values: dict[str, Tensor]) -> dict[str, float]:
        return {key: float(values[key]) for key in self.keys}


@TASKS.register("classification", "Single-label image classification (cross-entropy; accuracy, macro P/R/F1).")
class Classification(Task):
    """One class per image. The head predicts ``num_classes`` logits; the target is an int64 scalar."""

    kind = "classification"
    target_kind = TargetKind.LABEL
    level = "image"
    default_head = "mlp"
    metric_directions: ClassVar[dict[str, bool]] = {
        "accuracy": True,
        "precision": True,
        "recall": True,
        "f1": True,
    }
    primary_metric = "accuracy"

    def __init__(
        self,
        name: str,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(name)
        require_count(name, "num_classes", num_classes, 2)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ConfigError(f"Task {name!r}: label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        self.num_classes = num_classes
        self.class_names = name_list(name, "class_names", num_classes, class_names)
        self.label_smoothing = float(label_smoothing)

    @property
    def output_channels(self) -> int:
        return self.num_classes

    def loss(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        valid = valid.to(torch.bool)
        # Unlabelled samples hold a placeholder; class 0 keeps cross-entropy defined, the mask removes it.
        target = torch.where(valid, target, torch.zeros_like(target))
        per_sample = F.cross_entropy(prediction, target, reduction="none", label_smoothing=self.label_smoothing)
        return masked_mean(per_sample, valid)

    def metric(self) -> ClassificationMetric:
        return ClassificationMetric(self.num_classes)

    def placeholder_target(self, height: int, width: int) -> Tensor:
        return torch.tensor(0, dtype=torch.int64)

    def check_target(self, target: Any, where: str) -> None:
        require(
            isinstance(target, Tensor),
            where,
            f"task {self.name!r}: the label must be a tensor, got {type(target).__name__}.",
        )
        require(
            target.dtype == torch.int64 and target.ndim == 0,
            where,
            f"task {self.name!r}: the label must be an int64 scalar, got {target.dtype} of shape "
            f"{tuple(target.shape)}.",
        )
        label = int(target)
        require(
            0 <= label < self.num_classes,
            where,
            f"task {self.name!r}: label {label} is out of range; expected 0 to {self.num_classes - 1}.",
        )

    def decode(self, prediction: Tensor) -> list[dict[str, Any]]:
        probabilities = prediction.detach().float().softmax(dim=1).cpu()
        results = []
        for row in probabilities:
            label = int(row.argmax())
            results.append(
                {
                    "label": label,
                    "class_name": self.class_names[label],
                    "score": float(row[label]),
                    "probabilities": [float(p) for p in row],
                }
            )
        return results

    def draw(self, image: np.ndarray, decoded: dict[str, Any]) -> np.ndarray:
        return draw_text(image, [f"{self.name}: {decoded['class_name']} ({decoded['score']:.2f})"])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "label_smoothing": self.label_smoothing,
        }
