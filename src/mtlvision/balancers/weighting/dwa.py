"""Dynamic Weight Average."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting, WeightingError
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "dwa",
    "Dynamic Weight Average: weights from the rate at which each task's epoch loss falls.",
    "Liu, Johns & Davison, CVPR 2019 (MTAN)",
)
class DWA(LossWeighting):
    """Liu et al. (2019): at epoch ``e ≥ 2``, ``w_t = T·softmax(r / temperature)_t`` with
    ``r_t = L̄_t(e-1) / L̄_t(e-2)`` the ratio of the task's mean training loss over the last two epochs
    (``temperature = 2`` in the paper); ``w = 1`` during the first two epochs. The trainer supplies the epoch
    means through :meth:`on_epoch_end`. The weights always sum to ``T``.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("history",)

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"balancer.temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.history: Tensor | None = None  # the last (at most two) epoch mean losses, [≤2, T]

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        row = mean_losses.detach().to("cpu", torch.float64).reshape(1, -1)
        self.history = row if self.history is None else torch.cat([self.history[-1:], row])

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        num_tasks = losses.numel()
        if self.history is None or len(self.history) < 2:
            return Update(weights=torch.ones_like(losses.detach()))
        if self.history.shape[1] != num_tasks:
            raise ConfigError(f"DWA's loss history has {self.history.shape[1]} tasks but got {num_tasks} losses")
        previous, last = self.history[0], self.history[1]
        if not (torch.isfinite(previous).all() and (previous > 0).all() and torch.isfinite(last).all()):
            raise WeightingError(
                f"DWA divides by each task's mean loss two epochs ago, which must be finite and positive; "
                f"got {previous.tolist()}"
            )
        weights = num_tasks * torch.softmax((last / previous) / self.temperature, dim=0)
        return Update(weights=weights.to(device=losses.device, dtype=losses.dtype))
