"""Helpers shared by the dense (per-pixel) tasks: size checks and per-sample means over labelled pixels."""

from __future__ import annotations

import torch
from torch import Tensor


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
