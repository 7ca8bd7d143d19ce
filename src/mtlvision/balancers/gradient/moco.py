"""MoCo: MGDA weights on tracked (bias-corrected) task gradients (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import ExtraStateMixin, Needs, TaskGradients, Update, jacobian_shaped_state, require_grads
from mtlvision.balancers.gradient._base import GradientBalancer
from mtlvision.balancers.gradient._solvers import project_to_simplex, to_numpy_gramian
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "moco",
    "MoCo: track each task's gradient with a running estimate, then a projected step on the MGDA weights.",
    "Fernando et al., Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach, ICLR 2023",
)
class MoCo(ExtraStateMixin, GradientBalancer):
    """MoCo (Fernando et al. 2023, Algorithm 1), at step k:
    ``Y ← Y − β_k(Y − G)``, ``λ ← Π_Δ(λ − γ_k(YYᵀ + ρI)λ)``, ``d = Yᵀλ`` with ``β_k = β/k^{σ_β}`` and
    ``γ_k = γ/k^{σ_γ}``. ``Y`` (the tracked gradients, zero at the start), ``λ`` (``1/T``) and ``k`` are kept
    in the checkpoint. ``d`` is not a combination of this step's gradients, so it is returned as
    ``direction``; ``weights`` are ``λ``. Defaults are LibMTL's port of the authors' code. That port also
    rescales each gradient to norm ``L_t`` and replaces the projection by a softmax; we follow the paper.
    """

    needs: ClassVar[Needs] = Needs.JACOBIAN
    _state_names: ClassVar[tuple[str, ...]] = ("step", "tracked", "lambd")

    def __init__(
        self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5, rho: float = 0.0
    ) -> None:
        super().__init__()
        if not 0 < beta <= 1 or gamma <= 0 or rho < 0 or beta_sigma < 0 or gamma_sigma < 0:
            raise ConfigError(
                "balancer.beta in (0, 1], gamma > 0, rho ≥ 0 and non-negative sigmas required, got "
                f"beta={beta}, gamma={gamma}, rho={rho}, beta_sigma={beta_sigma}, gamma_sigma={gamma_sigma}"
            )
        self.beta, self.beta_sigma = beta, beta_sigma
        self.gamma, self.gamma_sigma = gamma, gamma_sigma
        self.rho = rho
        self.step = 0
        self.tracked: Tensor | None = None
        self.lambd: Tensor | None = None

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        grads = require_grads(self, grads)
        t, shape = grads.num_tasks, (grads.num_tasks, grads.num_columns)
        if self.tracked is not None and tuple(self.tracked.shape) != shape:
            raise ConfigError(f"MoCo state is for gradients {tuple(self.tracked.shape)}, got {shape}")
        if self.lambd is None:
            self.lambd = torch.full((t,), 1.0 / t, dtype=torch.float64)
        self.step += 1
        beta = self.beta / self.step**self.beta_sigma
        gamma = self.gamma / self.step**self.gamma_sigma
        tracked: Tensor | None = None
        # Y ← (1 − β)Y + βG block by block, in place: no [T, P] temporary beside the tracked gradients.
        for columns, block in grads.jacobian_blocks(release=True):
            if tracked is None:
                tracked = jacobian_shaped_state(self.tracked, shape, block)
            tracked[:, columns].mul_(1 - beta).add_(block.detach(), alpha=beta)
        assert tracked is not None
        self.tracked = tracked
        gramian = to_numpy_gramian(tracked @ tracked.T)
        lambd = self.lambd.numpy()
        lambd = project_to_simplex(lambd - gamma * (gramian @ lambd + self.rho * lambd))
        self.lambd = torch.from_numpy(lambd)
        weights = self.lambd.to(device=tracked.device, dtype=tracked.dtype)
        return Update(weights=weights.to(losses.dtype), direction=weights @ tracked)
