"""Helpers shared by the dense (per-pixel) tasks: size checks and the averaging of per-pixel losses."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlvision.tasks.base import masked_mean

#: How a dense loss averages its per-pixel values: ``sample`` (each sample's mean over its labelled pixels,
#: then the mean over samples, so every image counts the same) or ``pixel`` (the mean over every labelled
#: pixel of the batch, as mtan's and LibMTL's NYUv2 / Cityscapes losses do).
REDUCTIONS = ("sample", "pixel")


def require_same_size(task: str, prediction: Tensor, target: Tensor) -> None:
    """Raise ``ValueError`` unless the prediction has the target's spatial size (dense heads predict at the
    input resolution)."""
    if tuple(prediction.shape[-2:]) != tuple(target.shape[-2:]):
        raise ValueError(
            f"Task {task!r}: the prediction is {tuple(prediction.shape[-2:])} pixels but the target "
            f"{tuple(target.shape[-2:])}; a dense head must predict at the resolution of its targets."
        )


def per_sample_mean(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's mean of ``values`` over its pixels where ``mask`` holds, and whether it has any.

    ``values`` and ``mask`` are ``[B, ...]``; pixels outside the mask contribute nothing, not even a NaN,
    to the value or to its gradient.
    """
    kept = torch.where(mask, values, torch.zeros_like(values))
    counts = mask.flatten(1).sum(dim=1)
    return kept.flatten(1).sum(dim=1) / counts.clamp_min(1).to(values.dtype), counts > 0


def reduce_pixels(per_pixel: Tensor, mask: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """A batch's loss from per-pixel values ``[B, ...]`` over the pixels where ``mask`` holds (labelled pixels
    of valid samples), averaged as ``reduction`` (one of :data:`REDUCTIONS`) says; zero with the graph kept
    when nothing is labelled."""
    if reduction == "pixel":
        kept = torch.where(mask, per_pixel, torch.zeros_like(per_pixel))
        return kept.sum() / mask.sum().clamp_min(1).to(per_pixel.dtype)
    per_sample, labelled = per_sample_mean(per_pixel, mask)
    return masked_mean(per_sample, valid.to(torch.bool) & labelled)
