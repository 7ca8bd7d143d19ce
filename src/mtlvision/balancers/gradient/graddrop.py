"""GradDrop: drop gradient components by the sign-purity of the task gradients (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import Needs, TaskGradients, Update, require_grads
from mtlvision.balancers.gradient._base import GradientBalancer
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "graddrop",
    "GradDrop: keep, per coordinate, only the gradients of one sign, chosen by the sign purity.",
    "Chen et al., Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout, NeurIPS 2020",
)
class GradDrop(GradientBalancer):
    """GradDrop (Chen et al. 2020, Algorithm 1, lines 10–15) with ``f`` the identity.

    Per coordinate, ``P = ½(1 + Σ_i g_i / Σ_i |g_i|)`` (½ where every gradient is 0), ``U ~ Uniform[0,1)``,
    ``M_i = [P > U][g_i > 0] + [P < U][g_i < 0]`` and ``d = Σ_i (ℓ_i + (1 − ℓ_i) M_i) g_i`` with leaks ``ℓ``
    (default 0). The paper applies it to the gradients of a shared activation (representation mode); its
    ``sign(A)`` factor and batch sum estimate the sign of the weight gradients behind each activation,
    which the parameter mode sees directly. The engine hands flattened gradients without the activation
    values, so in representation mode the purity test runs on ``∂L_i/∂A`` per element, without the
    ``sign(A)`` factor (which is 1 wherever a ReLU output is positive) and without the batch sum.
    ``weights`` are ones: GradDrop leaves the task-specific gradients untouched.
    """

    needs: ClassVar[Needs] = Needs.JACOBIAN
    supports_representation: ClassVar[bool] = True

    def __init__(self, leak: float | Sequence[float] = 0.0) -> None:
        super().__init__()
        leaks = [float(leak)] if isinstance(leak, int | float) else [float(v) for v in leak]
        if any(not 0.0 <= v <= 1.0 for v in leaks):
            raise ConfigError(f"balancer.leak must lie in [0, 1], got {leak!r}")
        self.leak = leaks if not isinstance(leak, int | float) else float(leak)

    def _leaks(self, t: int, like: Tensor) -> Tensor | float:
        """The leaks ``ℓ``: one number for every task, else ``[T, 1]``."""
        if isinstance(self.leak, float):
            return self.leak
        if len(self.leak) != t:
            raise ConfigError(f"balancer.leak has {len(self.leak)} values but there are {t} tasks")
        return torch.tensor(self.leak, dtype=like.dtype, device=like.device)[:, None]

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        grads = require_grads(self, grads)
        direction: Tensor | None = None
        # Coordinate-wise, so computed block by block, each block of the Jacobian released once used. Per
        # coordinate only sums over the tasks are needed: with r_i = max(g_i, 0), Σ |g_i| = 2 Σ r_i − Σ g_i
        # gives the purity, and Σ (ℓ_i + (1 − ℓ_i) M_i) g_i is Σ ℓ_i g_i plus Σ (1 − ℓ_i) r_i where the
        # positive sign is kept, Σ (1 − ℓ_i) (g_i − r_i) where the negative one is: one [T, n] temporary (r)
        # and a few [n] vectors, not a mask per task.
        for columns, block in grads.jacobian_blocks(release=True):
            block = block.detach()
            if direction is None:
                direction = block.new_empty(grads.num_columns)
                leaks = self._leaks(block.shape[0], block)
            total = block.sum(dim=0)
            positives = block.clamp_min(0.0)
            positive = positives.sum(dim=0)
            leaked: Tensor | None = None  # no leak (the default): nothing to add
            if isinstance(leaks, float):
                unleaked, kept_positive = total, positive
                if leaks:
                    leaked, unleaked, kept_positive = leaks * total, (1.0 - leaks) * total, (1.0 - leaks) * positive
            else:
                unleaked = ((1.0 - leaks) * block).sum(dim=0)
                leaked, kept_positive = total - unleaked, ((1.0 - leaks) * positives).sum(dim=0)
            del positives
            magnitude = 2.0 * positive - total
            ratio = total / magnitude.clamp_min(torch.finfo(total.dtype).tiny)
            purity = 0.5 * (1.0 + torch.where(magnitude > 0, ratio, 0.0))
            uniform = torch.rand(purity.shape, dtype=purity.dtype, device=purity.device)
            kept = torch.where(purity > uniform, kept_positive, unleaked - kept_positive)
            kept.masked_fill_(purity == uniform, 0.0)  # neither sign is kept where P = U
            direction[columns] = kept if leaked is None else leaked + kept
        assert direction is not None
        return Update(weights=torch.ones_like(losses.detach()), direction=direction)
