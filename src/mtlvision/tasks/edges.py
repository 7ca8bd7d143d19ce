"""Semantic edges (boundaries): an edge probability per pixel, weighted binary cross-entropy, odsF."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtlvision.errors import ConfigError
from mtlvision.tasks.base import TargetKind, Task, require
from mtlvision.tasks.drawing import resize_bilinear, to_rgb_uint8
from mtlvision.tasks.edge_metric import BoundaryMetric
from mtlvision.tasks.params import require_count
from mtlvision.tasks.pixelwise import reduce_pixels, require_same_size
from mtlvision.tasks.registry import TASKS

#: the colour predicted edges are drawn in
EDGE_COLOUR = np.array([255.0, 32.0, 32.0])


def weighted_bce(logits: Tensor, edges: Tensor, pos_weight: float) -> Tensor:
    """Per pixel ``-w y log σ(x) - (1 - w)(1 - y) log(1 - σ(x))``: the balanced cross-entropy of HED (Xie and
    Tu, ICCV 2015) with the fixed positive weight ``w`` of the MTL survey code (``pos_weight`` 0.95 for
    PASCAL-Context and NYUD edges)."""
    truth = edges.to(logits.dtype)
    weight = pos_weight * truth + (1.0 - pos_weight) * (1.0 - truth)
    return weight * F.binary_cross_entropy_with_logits(logits, truth, reduction="none")


def _require_fraction(task: str, parameter: str, value: float, low: float, high: float, closed: bool) -> None:
    inside = low <= value <= high if closed else low < value < high
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not inside:
        bounds = f"[{low}, {high}]" if closed else f"({low}, {high})"
        raise ConfigError(f"Task {task!r}: {parameter} must be a number in {bounds}, got {value!r}.")


@TASKS.register(
    "edges",
    "Semantic edges / boundaries (weighted BCE, positive weight 0.95; odsF at a tolerance).",
    citation="Martin et al., Learning to Detect Natural Image Boundaries, TPAMI 2004 (odsF); Vandenhende et al., "
    "Multi-Task Learning for Dense Prediction Tasks: A Survey, TPAMI 2021",
)
class Edges(Task):
    """An edge probability per pixel. The head predicts ``[B, 1, H, W]`` logits at input resolution; the target
    is an int64 ``[H, W]`` map of 1 (edge), 0 (no edge) and ``ignore_index`` (unlabelled), which the joint
    transforms treat as a mask: nearest-neighbour resize, padding with ``ignore_index``, flip.

    The loss is :func:`weighted_bce` averaged over each sample's labelled pixels, then over the valid samples
    that have any. The survey code divides by every pixel of the batch and, with a fixed positive weight, does
    not mask its void pixels; here unlabelled pixels cost nothing. ``odsF`` is
    :mod:`mtlvision.tasks.edge_metric`'s, with the match radius ``tolerance`` times the image diagonal
    (0.0075, the survey's value for NYUD and PASCAL-Context: under one pixel below 94 x 94 pixels, where only
    exact hits count) at ``thresholds`` evenly spaced thresholds.
    """

    kind = "edges"
    target_kind = TargetKind.EDGES
    level = "dense"
    default_head = "fpn"
    metric_directions: ClassVar[dict[str, bool]] = {"odsF": True}
    primary_metric = "odsF"

    def __init__(
        self,
        name: str,
        pos_weight: float = 0.95,
        tolerance: float = 0.0075,
        thresholds: int = 99,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(name)
        _require_fraction(name, "pos_weight", pos_weight, 0.0, 1.0, closed=False)
        _require_fraction(name, "tolerance", tolerance, 0.0, 1.0, closed=True)
        require_count(name, "thresholds", thresholds, 1)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or ignore_index in (0, 1):
            raise ConfigError(
                f"Task {name!r}: ignore_index must be an integer other than 0 and 1, got {ignore_index!r}."
            )
        self.pos_weight = float(pos_weight)
        self.tolerance = float(tolerance)
        self.thresholds = thresholds
        self.ignore_index = ignore_index

    @property
    def output_channels(self) -> int:
        return 1

    def loss(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        require_same_size(self.name, prediction, target)
        valid = valid.to(torch.bool)
        labelled = (target != self.ignore_index) & valid[:, None, None]
        per_pixel = weighted_bce(prediction[:, 0].float(), (target == 1), self.pos_weight)
        return reduce_pixels(per_pixel, labelled, valid, "sample")

    def metric(self) -> BoundaryMetric:
        return BoundaryMetric(self.name, self.tolerance, self.thresholds, self.ignore_index)

    def placeholder_target(self, height: int, width: int) -> Tensor:
        return torch.full((height, width), self.ignore_index, dtype=torch.int64)

    def check_target(self, target: Any, where: str) -> None:
        require(
            isinstance(target, Tensor),
            where,
            f"task {self.name!r}: the edge map must be a tensor, got {type(target).__name__}.",
        )
        require(
            target.dtype == torch.int64 and target.ndim == 2 and target.numel() > 0,
            where,
            f"task {self.name!r}: the edge map must be a non-empty int64 [H, W] tensor, got {target.dtype} of "
            f"shape {tuple(target.shape)}.",
        )
        bad = target[(target != self.ignore_index) & (target != 0) & (target != 1)]
        require(
            bad.numel() == 0,
            where,
            f"task {self.name!r}: the edge map holds values {torch.unique(bad)[:5].tolist()}; allowed are 0 (no "
            f"edge), 1 (edge) and {self.ignore_index} (unlabelled).",
        )

    def decode(self, prediction: Tensor) -> list[dict[str, Any]]:
        """Per sample: ``probability``, the ``H x W`` float32 edge probability (saved as .npy), ``edges``, the
        uint8 map of pixels at probability >= 0.5 (1, else 0; saved as PNG), and ``edge_pixels``, their count."""
        results = []
        for probability in torch.sigmoid(prediction.detach().float()).cpu()[:, 0].numpy():
            edges = (probability >= 0.5).astype(np.uint8)
            results.append({"probability": probability, "edges": edges, "edge_pixels": int(edges.sum())})
        return results

    def draw(self, image: np.ndarray, decoded: dict[str, Any]) -> np.ndarray:
        """The image with each pixel tinted red in proportion to its edge probability."""
        rgb = to_rgb_uint8(image).astype(np.float64)
        height, width = rgb.shape[:2]
        alpha = np.clip(resize_bilinear(np.asarray(decoded["probability"]), height, width), 0.0, 1.0)[..., None]
        return np.clip(np.rint((1.0 - alpha) * rgb + alpha * EDGE_COLOUR), 0, 255).astype(np.uint8)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "pos_weight": self.pos_weight,
            "tolerance": self.tolerance,
            "thresholds": self.thresholds,
            "ignore_index": self.ignore_index,
        }
