"""Semantic segmentation: one class per pixel, cross-entropy over labelled pixels, mIoU and pixel accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from mtlvision.errors import ConfigError
from mtlvision.tasks.base import TargetKind, Task, require
from mtlvision.tasks.collection import ValidSampleMetrics
from mtlvision.tasks.drawing import overlay_classes
from mtlvision.tasks.params import name_list, require_choice, require_count
from mtlvision.tasks.pixelwise import REDUCTIONS, reduce_pixels, require_same_size
from mtlvision.tasks.registry import TASKS


class SegmentationMetric(ValidSampleMetrics):
    """mIoU and pixel accuracy from one confusion matrix accumulated over every labelled pixel of the split.

    The matrix is torchmetrics' ``MulticlassConfusionMatrix`` (rows: target, columns: prediction), which
    drops ``ignore_index`` pixels, counts with one bincount per batch and sums across processes.

    - ``pixel_accuracy`` = trace / total.
    - ``miou``: IoU_c = TP_c / (TP_c + FP_c + FN_c), averaged over the classes whose union
      TP_c + FP_c + FN_c is non-zero, i.e. the classes present in the targets or the predictions of the
      split. This is the confusion-matrix definition of mtan and LibMTL, except that they average over every
      class, so that a class absent from both turns their mean into NaN; we leave such classes out.
    """

    def __init__(self, task: str, num_classes: int, ignore_index: int) -> None:
        self.task = task
        super().__init__(
            {"confusion": MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)},
            keys=Segmentation.metric_directions,
        )

    def prepare(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        require_same_size(self.task, prediction, target)
        return prediction.argmax(dim=1), target

    def summarise(self, values: dict[str, Tensor]) -> dict[str, float]:
        confusion = values["confusion"].to(torch.float64)
        hits = confusion.diagonal()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - hits
        present = union > 0
        total = confusion.sum()
        return {
            "miou": float((hits[present] / union[present]).mean()) if bool(present.any()) else float("nan"),
            "pixel_accuracy": float(hits.sum() / total) if total > 0 else float("nan"),
        }


@TASKS.register("segmentation", "Semantic segmentation (pixel cross-entropy; mIoU, pixel accuracy).")
class Segmentation(Task):
    """A class per pixel. The head predicts ``[B, C, H, W]`` logits at input resolution; the target is an
    int64 ``[H, W]`` map where ``ignore_index`` marks unlabelled pixels.

    The loss is each sample's mean cross-entropy over its labelled pixels, averaged over the valid samples
    that have at least one labelled pixel.
    ``reduction`` (``sample`` or ``pixel``, see :data:`~mtlvision.tasks.pixelwise.REDUCTIONS`) picks how
    the per-pixel losses average; ``pixel`` pools the batch's labelled pixels as mtan and LibMTL do.
    """

    kind = "segmentation"
    target_kind = TargetKind.MASK
    level = "dense"
    default_head = "fpn"
    metric_directions: ClassVar[dict[str, bool]] = {"miou": True, "pixel_accuracy": True}
    primary_metric = "miou"

    def __init__(
        self,
        name: str,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        reduction: str = "sample",
    ) -> None:
        super().__init__(name)
        require_count(name, "num_classes", num_classes, 2)
        require_choice(name, "reduction", reduction, REDUCTIONS)
        self.reduction = reduction
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"Task {name!r}: ignore_index must be an integer outside the class range 0..{num_classes - 1}, "
                f"got {ignore_index!r}."
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = name_list(name, "class_names", num_classes, class_names)

    @property
    def output_channels(self) -> int:
        return self.num_classes

    def loss(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        require_same_size(self.name, prediction, target)
        valid = valid.to(torch.bool)
        target = torch.where(valid[:, None, None], target, torch.full_like(target, self.ignore_index))
        per_pixel = F.cross_entropy(prediction, target, ignore_index=self.ignore_index, reduction="none")
        return reduce_pixels(per_pixel, target != self.ignore_index, valid, self.reduction)

    def metric(self) -> SegmentationMetric:
        return SegmentationMetric(self.name, self.num_classes, self.ignore_index)

    def placeholder_target(self, height: int, width: int) -> Tensor:
        return torch.full((height, width), self.ignore_index, dtype=torch.int64)

    def check_target(self, target: Any, where: str) -> None:
        require(
            isinstance(target, Tensor),
            where,
            f"task {self.name!r}: the mask must be a tensor, got {type(target).__name__}.",
        )
        require(
            target.dtype == torch.int64 and target.ndim == 2 and target.numel() > 0,
            where,
            f"task {self.name!r}: the mask must be a non-empty int64 [H, W] tensor, got {target.dtype} of "
            f"shape {tuple(target.shape)}.",
        )
        bad = target[(target != self.ignore_index) & ((target < 0) | (target >= self.num_classes))]
        require(
            bad.numel() == 0,
            where,
            f"task {self.name!r}: the mask holds class values {torch.unique(bad)[:5].tolist()} outside "
            f"0..{self.num_classes - 1} (and not the ignore value {self.ignore_index}).",
        )

    def decode(self, prediction: Tensor) -> list[dict[str, Any]]:
        """Per sample: ``mask``, an ``H x W`` class map (uint8 up to 256 classes, else uint16/int64) that the
        predictor writes as a PNG, and ``class_histogram``, the pixel count of each predicted class."""
        dtype = next(t for t in (np.uint8, np.uint16, np.int64) if self.num_classes <= np.iinfo(t).max + 1)
        results = []
        for classes in prediction.detach().argmax(dim=1).cpu():
            counts = torch.bincount(classes.flatten(), minlength=self.num_classes)
            histogram = {self.class_names[c]: int(n) for c, n in enumerate(counts.tolist()) if n > 0}
            results.append({"mask": classes.numpy().astype(dtype), "class_histogram": histogram})
        return results

    def draw(self, image: np.ndarray, decoded: dict[str, Any]) -> np.ndarray:
        return overlay_classes(image, decoded["mask"])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "class_names": list(self.class_names),
            "reduction": self.reduction,
        }
