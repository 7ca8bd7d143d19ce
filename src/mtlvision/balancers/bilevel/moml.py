"""MOML: multi-objective meta-learning of the task weights (Ye et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlvision.balancers.bilevel._base import BilevelBalancer, BilevelProblem, flat, gradients, moved
from mtlvision.balancers.gradient._solvers import min_norm_weights
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "moml",
    "MOML: task weights move along MGDA's common descent direction of every task's validation loss.",
    "Ye et al., Multi-Objective Meta Learning, NeurIPS 2021 (AIJ 2024)",
)
class MOML(BilevelBalancer):
    """MOML (Ye et al. 2021), as LibMTL's one-inner-step implementation (``bacth_forward_MOML``). With
    ``w = softmax(ξ)`` and ``G`` [T, P] the per-task gradients of the training batch's losses at ``θ``, the
    inner step is ``θ' = θ − β Gᵀw`` (``inner_lr`` β, default 0.1), linear in ``w``, so each task's
    validation loss ``V_t(θ')`` has the exact hypergradient ``h_t = −β J_softmax(ξ)ᵀ G ∇V_t(θ')``. The ``h_t``
    are normalised to unit length (MGDA's ``l2`` normalisation; a zero ``h_t`` stays zero) and combined by
    MGDA's min-norm weights; ``ξ`` moves along that combination with Adam (``outer_lr``, default 1e-3). The
    outer batch comes from the validation split (LibMTL samples a second training batch). Extra cost per
    step: two forward passes and ``2T`` backward passes (one per task at ``θ`` and at ``θ'``).
    """

    def __init__(self, inner_lr: float = 0.1, outer_lr: float = 1e-3) -> None:
        super().__init__(outer_lr)
        if not inner_lr > 0:
            raise ConfigError(f"balancer.inner_lr must be > 0, got {inner_lr}")
        self.inner_lr = float(inner_lr)

    def meta_gradient(self, problem: BilevelProblem) -> Tensor:
        params, beta = problem.parameters, self.inner_lr
        train = problem.train_losses(params)
        t = train.numel()
        jac = torch.stack([flat(gradients(train[i], params, retain_graph=i < t - 1)) for i in range(t)])
        virtual = moved(params, self.task_weights().to(jac) @ jac, -beta)
        val = problem.val_losses(virtual)
        val_jac = torch.stack([flat(gradients(val[i], virtual, retain_graph=i < t - 1)) for i in range(t)])
        rows = -beta * (val_jac.double() @ jac.double().T).cpu() @ self.softmax_jacobian()  # row t: h_t
        norms = rows.norm(dim=1, keepdim=True)
        rows = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), 0.0)
        alpha = torch.from_numpy(min_norm_weights((rows @ rows.T).numpy()))
        return alpha @ rows
