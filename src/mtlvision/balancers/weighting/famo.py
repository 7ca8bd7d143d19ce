"""Fast Adaptive Multitask Optimization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.registry import BALANCERS
from mtlvision.balancers.weighting._common import LossWeighting, checked_losses
from mtlvision.errors import ConfigError, InternalError


@BALANCERS.register(
    "famo",
    "FAMO: task logits updated from the observed log-loss decrease; O(1) extra cost per step.",
    "Liu et al., NeurIPS 2023",
)
class FAMO(LossWeighting):
    """Liu et al. (2023). With logits ``ξ`` (initialised to 0), ``z = softmax(ξ)`` and ``D_t = L_t − b_t``
    (``b`` the loss lower bounds, 0 by default), the model follows the gradient of ``Σ_t (z_t / c)·log D_t``
    with ``c = Σ_t z_t / D_t``: effective weights ``w_t = z_t / (c·D_t)``, which sum to one.

    After the optimiser step the trainer evaluates the same batch again and calls :meth:`after_step`; the
    logits then move along ``δ = J_softmax(ξ)ᵀ [log D_t(θ_t) − log D_t(θ_{t+1})]`` with Adam (lr ``β = 0.025``,
    weight decay ``γ = 1e-3``), as in the paper's Algorithm 2 (Appendix C) and LibMTL; the authors' code
    uses ``γ = 1e-5`` for some benchmarks. ``eps`` (1e-8, as in the paper's code) keeps ``log D`` finite.
    """

    needs_post_step_losses: ClassVar[bool] = True
    _state_names: ClassVar[tuple[str, ...]] = ("logits", "previous", "optimizer_state")

    def __init__(
        self, lr: float = 0.025, gamma: float = 1e-3, min_losses: Sequence[float] | float = 0.0, eps: float = 1e-8
    ) -> None:
        super().__init__()
        if not lr > 0 or gamma < 0 or eps < 0:
            raise ConfigError(f"FAMO needs lr > 0, gamma >= 0 and eps >= 0; got lr={lr}, gamma={gamma}, eps={eps}")
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        self.min_losses = torch.as_tensor(min_losses, dtype=torch.float64)
        self.logits: Tensor | None = None
        self.previous: Tensor | None = None
        self.optimizer_state: dict[str, Any] | None = None
        self._optimizer: torch.optim.Adam | None = None

    def _distance(self, losses: Tensor) -> Tensor:
        return checked_losses(self, losses, self.min_losses.to(losses.device), strict=False) + self.eps

    def _adam(self) -> torch.optim.Adam:
        assert self.logits is not None
        if self._optimizer is None or self._optimizer.param_groups[0]["params"][0] is not self.logits:
            self._optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.gamma)
            if self.optimizer_state is not None:
                self._optimizer.load_state_dict(self.optimizer_state)
        return self._optimizer

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        if self.logits is None:
            self.logits = torch.zeros(losses.numel(), dtype=torch.float64)
        if self.logits.numel() != losses.numel():
            raise ConfigError(f"FAMO has logits for {self.logits.numel()} tasks but got {losses.numel()} losses")
        distance = self._distance(losses).cpu()
        z = torch.softmax(self.logits, dim=0)
        weights = (z / distance) / (z / distance).sum()
        self.previous = distance
        return Update(weights=weights.to(device=losses.device, dtype=losses.dtype))

    def after_step(self, new_losses: Tensor) -> None:
        if self.previous is None or self.logits is None:
            raise InternalError("FAMO.after_step was called before any balance() step")
        decrease = self.previous.log() - self._distance(new_losses).cpu().log()
        z = torch.softmax(self.logits, dim=0)
        optimizer = self._adam()
        self.logits.grad = z * (decrease - (z * decrease).sum())  # softmax's vector-Jacobian product
        optimizer.step()
        self.logits.grad = None
        self.optimizer_state = optimizer.state_dict()
