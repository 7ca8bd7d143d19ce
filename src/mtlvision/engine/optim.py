"""Optimisers and learning-rate schedules by name (registries, so the config lists what exists)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adam": lambda groups, lr, weight_decay, momentum: torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay),
    "adamw": lambda groups, lr, weight_decay, momentum: torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay),
    "sgd": lambda groups, lr, weight_decay, momentum: torch.optim.SGD(
        groups, lr=lr, weight_decay=weight_decay, momentum=momentum
    ),
}


def build_optimizer(
    name: str, groups: Iterable[dict[str, Any]], lr: float, weight_decay: float, momentum: float
) -> Optimizer:
    """The optimiser ``name`` over parameter groups (a group's ``lr_scale`` multiplies ``lr``)."""
    groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": lr * g.get("lr_scale", 1.0)} for g in groups]
    return OPTIMIZERS[name](groups, lr, weight_decay, momentum)


def _warmup(epoch: int, warmup_epochs: int) -> float:
    """Linear warm-up factor over the first ``warmup_epochs`` epochs."""
    return (epoch + 1) / (warmup_epochs + 1) if epoch < warmup_epochs else 1.0


def _constant(epoch: int, epochs: int, warmup: int, step_size: int, gamma: float) -> float:
    return _warmup(epoch, warmup)


def _cosine(epoch: int, epochs: int, warmup: int, step_size: int, gamma: float) -> float:
    progress = max(epoch - warmup, 0) / max(epochs - warmup, 1)
    return _warmup(epoch, warmup) * 0.5 * (1 + math.cos(math.pi * progress))


def _step(epoch: int, epochs: int, warmup: int, step_size: int, gamma: float) -> float:
    return _warmup(epoch, warmup) * gamma ** (epoch // step_size)


#: learning-rate factor per epoch: (epoch, epochs, warmup_epochs, step_size, gamma) -> factor
SCHEDULES: dict[str, Callable[[int, int, int, int, float], float]] = {
    "none": _constant,
    "cosine": _cosine,
    "step": _step,
}


def build_scheduler(
    name: str, optimizer: Optimizer, epochs: int, warmup_epochs: int, step_size: int, gamma: float
) -> LRScheduler | ReduceLROnPlateau:
    """A per-epoch schedule; ``plateau`` reduces on the validation selection score."""
    if name == "plateau":
        return ReduceLROnPlateau(optimizer, mode="min", factor=gamma, patience=max(step_size // 2, 1))
    schedule = SCHEDULES[name]
    return LambdaLR(optimizer, lambda epoch: schedule(epoch, epochs, warmup_epochs, step_size, gamma))
