"""Equal and fixed weights: the baselines every method is compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting
from mtlvision.errors import ConfigError


@BALANCERS.register("ew", "Equal weights: the plain sum of task losses.", "baseline")
class EqualWeights(LossWeighting):
    """Equal weighting: ``Σ_t L_t``."""

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        return Update(weights=torch.ones_like(losses.detach()))


@BALANCERS.register("fixed", "Fixed per-task weights given in the config.", "baseline")
class FixedWeights(LossWeighting):
    """Fixed weights ``Σ_t w_t L_t`` with ``w`` from ``balancer.weights`` (one per task, in task order)."""

    fixed: Tensor

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        if any(w < 0 for w in weights):
            raise ConfigError(f"balancer.weights must be non-negative, got {list(weights)}")
        self.register_buffer("fixed", torch.tensor([float(w) for w in weights]))

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        if self.fixed.numel() != losses.numel():
            raise ConfigError(f"balancer.weights has {self.fixed.numel()} values but there are {losses.numel()} tasks")
        return Update(weights=self.fixed.to(device=losses.device, dtype=losses.dtype))
