"""Surface normal estimation: a unit vector per pixel, cosine or L1 loss, angular error statistics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mtlvision.tasks.base import TargetKind, Task, require
from mtlvision.tasks.drawing import resize_nearest, to_rgb_uint8
from mtlvision.tasks.params import require_choice
from mtlvision.tasks.pixelwise import REDUCTIONS, reduce_pixels, require_same_size
from mtlvision.tasks.registry import TASKS

#: a target vector shorter than this is "no normal" (invalid pixel).
ZERO_NORM = 1e-6
#: how far from 1 the length of a valid target normal may be.
UNIT_TOLERANCE = 1e-2
#: the angular error thresholds (degrees) of the "within" metrics.
THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}


def cosine_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """1 - cos(angle) per pixel, for unit vectors ``[B, 3, H, W]``."""
    return 1.0 - (prediction * target).sum(dim=1)


def l1_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Σ_c |n_c - n*_c| per pixel, for unit vectors ``[B, 3, H, W]``."""
    return (prediction - target).abs().sum(dim=1)


#: Normal losses: (unit prediction, unit target) -> per-pixel loss [B, H, W].
NORMAL_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"cosine": cosine_loss, "l1": l1_loss}


def valid_normals(target: Tensor) -> Tensor:
    """``[B, H, W]`` mask of the pixels that carry a normal (non-zero target vector)."""
    return target.norm(dim=1) > ZERO_NORM


def angular_error(prediction: Tensor, target: Tensor) -> Tensor:
    """The angle in degrees between ``[B, 3, H, W]`` vectors, per pixel.

    atan2(|a × b|, a · b) rather than acos(a · b): acos loses precision near 0°, where its slope is
    infinite (in float32, acos cannot resolve angles below about 0.02°).
    """
    cross = torch.linalg.cross(prediction, target, dim=1).norm(dim=1)
    dot = (prediction * target).sum(dim=1)
    return torch.rad2deg(torch.atan2(cross, dot))


class NormalsMetric(Metric):
    """Angular errors over every valid pixel of the split.

    ``mean_angle`` and the ``within_*`` percentages (error strictly below 11.25°, 22.5° and 30°, as in
    mtan and LibMTL) are exact sums over the split. ``median_angle`` is the median of every valid pixel's
    error over the split; storing every error of a split (NYUv2 val: ~72M pixels) is too costly, so the
    errors are counted in a histogram of :attr:`BIN_WIDTH` = 0.001° bins and the median is interpolated
    inside its bin: it is within one bin (0.001°) of the exact median. Every state is a sum, so processes
    under torch.distributed add up to the same result as one process.
    """

    BIN_WIDTH = 0.001
    full_state_update = False
    histogram: Tensor  # metric states (add_state)
    angle_sum: Tensor
    within: Tensor

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task
        self.bins = math.ceil(180.0 / self.BIN_WIDTH)
        self.add_state("histogram", default=torch.zeros(self.bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("angle_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within", default=torch.zeros(len(THRESHOLDS), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, target: Tensor, valid: Tensor) -> None:
        require_same_size(self.task, prediction, target)
        mask = valid_normals(target) & valid.to(device=target.device, dtype=torch.bool).view(-1, 1, 1)
        unit = F.normalize(prediction.detach().float(), dim=1)
        errors = angular_error(unit, target.float())[mask]
        index = (errors / self.BIN_WIDTH).long().clamp_(0, self.bins - 1)
        self.histogram += torch.bincount(index, minlength=self.bins)
        self.angle_sum += errors.to(torch.float64).sum()
        limits = torch.tensor(list(THRESHOLDS.values()), device=errors.device, dtype=errors.dtype)
        self.within += (errors[:, None] < limits).sum(dim=0)

    def compute(self) -> dict[str, float]:
        counts = self.histogram.cpu().to(torch.float64)  # a few scalar look-ups: cheaper on the CPU
        pixels = float(counts.sum())
        if pixels == 0:
            return {key: float("nan") for key in Normals.metric_directions}
        return {
            "mean_angle": float(self.angle_sum) / pixels,
            "median_angle": self._median(counts, pixels),
            **{key: 100.0 * float(n) / pixels for key, n in zip(THRESHOLDS, self.within.tolist())},
        }

    def _median(self, counts: Tensor, pixels: float) -> float:
        """numpy's median (the mean of the values of 0-based ranks ⌊(N-1)/2⌋ and ⌈(N-1)/2⌉), where the value
        of a rank is placed evenly among the errors of its bin: each is within one bin of the exact value."""
        cumulative = counts.cumsum(0)

        def value_of_rank(rank: int) -> float:
            index = int(torch.searchsorted(cumulative, torch.tensor(float(rank), dtype=torch.float64), right=True))
            before = float(cumulative[index] - counts[index])
            return (index + (rank - before + 0.5) / float(counts[index])) * self.BIN_WIDTH

        middle = (int(pixels) - 1) / 2
        return (value_of_rank(math.floor(middle)) + value_of_rank(math.ceil(middle))) / 2


@TASKS.register("normals", "Surface normals (cosine or L1 on unit vectors; mean/median angle, % within).")
class Normals(Task):
    """A unit normal per pixel (x right, y down, z towards the camera). The head predicts ``[B, 3, H, W]``,
    normalised to unit length by :meth:`postprocess`; the target is float32 ``[3, H, W]`` with all-zero
    vectors at pixels without a normal.

    The loss (``loss``, one of :data:`NORMAL_LOSSES`) compares unit vectors; it is each sample's mean over
    its valid pixels, averaged over the valid samples that have at least one valid pixel.
    ``reduction`` (``sample`` or ``pixel``, see :data:`~mtlvision.tasks.pixelwise.REDUCTIONS`) picks how
    the per-pixel losses average; ``pixel`` pools the batch's labelled pixels as mtan and LibMTL do.
    """

    kind = "normals"
    target_kind = TargetKind.NORMALS
    level = "dense"
    default_head = "fpn"
    metric_directions: ClassVar[dict[str, bool]] = {
        "mean_angle": False,
        "median_angle": False,
        "within_11_25": True,
        "within_22_5": True,
        "within_30": True,
    }
    primary_metric = "mean_angle"

    def __init__(self, name: str, loss: str = "cosine", reduction: str = "sample") -> None:
        super().__init__(name)
        require_choice(name, "loss", loss, list(NORMAL_LOSSES))
        require_choice(name, "reduction", reduction, REDUCTIONS)
        self.reduction = reduction
        self.loss_name = loss
        self._pixel_loss = NORMAL_LOSSES[loss]

    @property
    def output_channels(self) -> int:
        return 3

    def postprocess(self, raw: Tensor) -> Tensor:
        return F.normalize(raw, dim=1)

    def loss(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        # Normalising again is a no-op on postprocessed predictions and makes raw head outputs fine too.
        require_same_size(self.name, prediction, target)
        mask = valid_normals(target) & valid.to(torch.bool).view(-1, 1, 1)
        per_pixel = self._pixel_loss(F.normalize(prediction.float(), dim=1), target.float())
        return reduce_pixels(per_pixel, mask, valid, self.reduction)

    def metric(self) -> NormalsMetric:
        return NormalsMetric(self.name)

    def placeholder_target(self, height: int, width: int) -> Tensor:
        return torch.zeros((3, height, width), dtype=torch.float32)

    def check_target(self, target: Any, where: str) -> None:
        require(
            isinstance(target, Tensor),
            where,
            f"task {self.name!r}: the normal map must be a tensor, got {type(target).__name__}.",
        )
        require(
            target.is_floating_point() and target.ndim == 3 and target.shape[0] == 3 and target.numel() > 0,
            where,
            f"task {self.name!r}: the normal map must be a float [3, H, W] tensor, got "
            f"{target.dtype} of shape {tuple(target.shape)}.",
        )
        require(
            bool(torch.isfinite(target).all()),
            where,
            f"task {self.name!r}: the normal map holds NaN or infinite values; mark missing normals with (0, 0, 0).",
        )
        lengths = target.float().norm(dim=0)
        off = lengths[(lengths > ZERO_NORM) & ((lengths - 1.0).abs() > UNIT_TOLERANCE)]
        require(
            off.numel() == 0,
            where,
            f"task {self.name!r}: {off.numel()} normals are not unit vectors (lengths such as "
            f"{[round(v, 4) for v in off[:3].tolist()]}); normalise them, and mark missing normals with "
            f"(0, 0, 0).",
        )

    def decode(self, prediction: Tensor) -> list[np.ndarray]:
        """Per sample, the ``H x W x 3`` float32 array of unit normals (the predictor saves it as .npy)."""
        unit = F.normalize(prediction.detach().float(), dim=1).cpu()
        return [normals.permute(1, 2, 0).numpy().astype(np.float32) for normals in unit]

    def draw(self, image: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        """The normals as colours, (n + 1) / 2 in RGB, resized to the image."""
        height, width = np.asarray(image).shape[:2]
        colours = to_rgb_uint8((np.asarray(decoded, dtype=np.float64) + 1.0) / 2.0)
        return resize_nearest(colours, height, width)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "loss": self.loss_name, "reduction": self.reduction}
