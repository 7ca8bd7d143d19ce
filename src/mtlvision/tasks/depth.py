"""Monocular depth regression: a depth per pixel, L1 / L2 / berHu over valid pixels, abs/rel error and δ<1.25."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from mtlvision.tasks.base import TargetKind, Task, require
from mtlvision.tasks.drawing import colourise, resize_bilinear
from mtlvision.tasks.params import require_choice
from mtlvision.tasks.pixelwise import REDUCTIONS, reduce_pixels, require_same_size
from mtlvision.tasks.registry import TASKS

#: below this a predicted depth counts as this value in δ (a non-positive depth is never within 1.25×).
MIN_DEPTH = 1e-6


def l1_loss(residual: Tensor, valid: Tensor) -> Tensor:
    """|d - d*| per pixel."""
    return residual.abs()


def l2_loss(residual: Tensor, valid: Tensor) -> Tensor:
    """(d - d*)² per pixel."""
    return residual.square()


def berhu_loss(residual: Tensor, valid: Tensor) -> Tensor:
    """The reverse Huber loss of Laina et al., "Deeper Depth Prediction with Fully Convolutional Residual
    Networks" (3DV 2016): |x| up to c, (x² + c²) / 2c beyond, with c one fifth of the largest absolute
    residual over the batch's valid pixels (held constant in the gradient)."""
    magnitude = residual.abs()
    largest = torch.where(valid, magnitude, torch.zeros_like(magnitude)).max().detach()
    c = (0.2 * largest).clamp_min(torch.finfo(magnitude.dtype).tiny)
    return torch.where(magnitude <= c, magnitude, (magnitude.square() + c.square()) / (2 * c))


#: Depth losses: (prediction - target, valid-pixel mask) -> per-pixel loss.
DEPTH_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l1": l1_loss,
    "l2": l2_loss,
    "berhu": berhu_loss,
}


class DepthMetric(Metric):
    """Depth errors over every valid pixel of the split (a pixel-weighted mean; sums kept in float64).

    - ``abs_err`` = mean |d - d*|, ``rel_err`` = mean |d - d*| / d*, over pixels with d* > 0.
    - ``delta1`` = fraction of those pixels with max(d / d*, d* / d) < 1.25, predictions clamped at
      :data:`MIN_DEPTH` so that a non-positive prediction always fails.

    LibMTL's NYUv2 metric weights each batch's mean by the batch's valid-pixel count, which gives the same
    pixel-weighted mean; mtan averages the per-batch means with equal weights, which differs whenever batches
    hold different numbers of valid pixels.
    """

    full_state_update = False
    abs_sum: Tensor  # metric states (add_state)
    rel_sum: Tensor
    within: Tensor
    pixels: Tensor

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task
        for state in ("abs_sum", "rel_sum", "within", "pixels"):
            self.add_state(state, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, target: Tensor, valid: Tensor) -> None:
        require_same_size(self.task, prediction, target)
        mask = (target > 0) & valid.to(device=target.device, dtype=torch.bool).view(-1, 1, 1, 1)
        predicted = prediction.detach().to(torch.float64)[mask]
        truth = target.to(torch.float64)[mask]
        error = (predicted - truth).abs()
        clamped = predicted.clamp_min(MIN_DEPTH)
        ratio = torch.maximum(clamped / truth, truth / clamped)
        self.abs_sum += error.sum()
        self.rel_sum += (error / truth).sum()
        self.within += (ratio < 1.25).sum()
        self.pixels += truth.numel()

    def compute(self) -> dict[str, float]:
        pixels = float(self.pixels)
        if pixels == 0:
            return {key: float("nan") for key in Depth.metric_directions}
        return {
            "abs_err": float(self.abs_sum) / pixels,
            "rel_err": float(self.rel_sum) / pixels,
            "delta1": float(self.within) / pixels,
        }


@TASKS.register("depth", "Depth regression (L1/L2/berHu over valid pixels; abs and rel error, δ<1.25).")
class Depth(Task):
    """A depth per pixel. The head predicts ``[B, 1, H, W]`` at input resolution; the target is a float32
    ``[1, H, W]`` map in which 0 marks pixels without a measurement.

    The loss is each sample's mean per-pixel loss (``loss``, one of :data:`DEPTH_LOSSES`) over its valid
    pixels, averaged over the valid samples that have at least one valid pixel.
    ``reduction`` (``sample`` or ``pixel``, see :data:`~mtlvision.tasks.pixelwise.REDUCTIONS`) picks how
    the per-pixel losses average; ``pixel`` pools the batch's labelled pixels as mtan and LibMTL do.
    """

    kind = "depth"
    target_kind = TargetKind.DEPTH
    level = "dense"
    default_head = "fpn"
    metric_directions: ClassVar[dict[str, bool]] = {"abs_err": False, "rel_err": False, "delta1": True}
    primary_metric = "abs_err"

    def __init__(self, name: str, loss: str = "l1", reduction: str = "sample") -> None:
        super().__init__(name)
        require_choice(name, "loss", loss, list(DEPTH_LOSSES))
        require_choice(name, "reduction", reduction, REDUCTIONS)
        self.reduction = reduction
        self.loss_name = loss
        self._pixel_loss = DEPTH_LOSSES[loss]

    @property
    def output_channels(self) -> int:
        return 1

    def loss(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        require_same_size(self.name, prediction, target)
        valid = valid.to(torch.bool)
        mask = (target > 0) & valid.view(-1, 1, 1, 1)
        per_pixel = self._pixel_loss(prediction.float() - target.float(), mask)
        return reduce_pixels(per_pixel, mask, valid, self.reduction)

    def metric(self) -> DepthMetric:
        return DepthMetric(self.name)

    def placeholder_target(self, height: int, width: int) -> Tensor:
        return torch.zeros((1, height, width), dtype=torch.float32)

    def check_target(self, target: Any, where: str) -> None:
        require(
            isinstance(target, Tensor),
            where,
            f"task {self.name!r}: the depth map must be a tensor, got {type(target).__name__}.",
        )
        require(
            target.is_floating_point() and target.ndim == 3 and target.shape[0] == 1 and target.numel() > 0,
            where,
            f"task {self.name!r}: the depth map must be a float [1, H, W] tensor, got {target.dtype} "
            f"of shape {tuple(target.shape)}.",
        )
        require(
            bool(torch.isfinite(target).all()),
            where,
            f"task {self.name!r}: the depth map holds NaN or infinite values; mark missing depth with 0.",
        )
        require(
            bool((target >= 0).all()),
            where,
            f"task {self.name!r}: the depth map holds negative depths (smallest {float(target.min()):g}); "
            f"depth must be positive, with 0 marking missing depth.",
        )

    def decode(self, prediction: Tensor) -> list[np.ndarray]:
        """Per sample, the predicted ``H x W`` float32 depth map (the predictor saves it as .npy and draws it)."""
        return [depth[0].numpy().astype(np.float32) for depth in prediction.detach().float().cpu()]

    def draw(self, image: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        """The depth map through a colour map (near: dark, far: bright), resized to the image."""
        height, width = np.asarray(image).shape[:2]
        return colourise(resize_bilinear(np.asarray(decoded), height, width), cmap="magma")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "loss": self.loss_name, "reduction": self.reduction}
