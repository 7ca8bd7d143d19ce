"""FORUM: a first-order multi-gradient method for multi-objective bilevel optimisation (Ye et al., ECAI 2024)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import quadprog
import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.bilevel._base import BilevelBalancer, BilevelProblem, flat, gradients, moved
from mtlvision.balancers.gradient._solvers import SolverError
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError, InternalError

#: LibMTL's ``1e-8`` added to ``‖g_q‖²`` in the constraint's coefficients
_Q_EPS = 1e-8


def forum_weights(gramian: np.ndarray, phi: float) -> np.ndarray:
    """FORUM's QP (LibMTL's cvxpy problem): ``min_w wᵀKw − φ(‖g_q‖² + ε)·w_T`` over ``w ≥ 0`` [T+1] with
    ``Σ_{t<T} w_t = 1`` and ``w_T ≥ Σ_{t<T} π_t w_t``, ``π_t = φ − K_tT/(‖g_q‖² + ε)``, solved with quadprog.

    Args:
        gramian: ``K = A Aᵀ`` [T+1, T+1] of the T normalised upper-level gradients and ``g_q`` (last row).
        phi: FORUM's φ.

    Returns:
        The [T+1] weights. The QP is solved in variables of order one however large ``g_q`` is (a diverging
        inner loop): ``w_{<T}`` and the slack ``ρ = ‖g_q‖(w_T − πᵀw) ≥ 0``, using ``Σ_{t<T} w_t = 1`` to
        take the constant ``‖g_q‖φ`` out of ``‖g_q‖ w_T``; a relative ridge of 1e-12 keeps quadprog's matrix
        positive definite. The weights are accurate to about ``1e-17 ‖g_q‖²`` (1e-11 at ‖g_q‖ = 10⁶; a
        diverging inner loop, ‖g_q‖ ≈ 10¹⁵, leaves Σ_{t<T} w_t off 1 by 10⁻²).
    """
    t = gramian.shape[0] - 1
    norm = float(np.sqrt(gramian[t, t]))
    if not norm > 0:
        raise SolverError("FORUM: g_q = 0 (the lower level is stationary), where its QP is unbounded")
    linear = phi * (norm**2 + _Q_EPS)
    # u = ‖g_q‖ w_T = offset + m·w + ρ, and K in (w, u) has a unit last diagonal
    offset, m = norm * phi, -norm * gramian[:t, t] / (norm**2 + _Q_EPS)
    scale = np.append(np.ones(t), 1.0 / norm)
    k = gramian * np.outer(scale, scale)
    lift = np.zeros((t + 1, t + 1))  # (w, u − offset) = lift @ (w, ρ)
    lift[:t, :t] = np.eye(t)
    lift[t, :t], lift[t, t] = m, 1.0
    g = 2.0 * lift.T @ k @ lift
    g += 1e-12 * max(float(np.trace(g)), 1.0) * np.eye(t + 1)
    # linear terms of wᵀKw − linear·w_T at u = offset + e·x: 2·offset·k_{·,u} − linear/‖g_q‖ along e
    shift = np.zeros(t + 1)
    shift[t] = offset
    gradient = 2.0 * lift.T @ (k @ shift) - (linear / norm) * lift[t]
    simplex = np.append(np.ones(t), 0.0)[:, None]
    positive = lift[t][:, None]  # w_T ≥ 0: offset + e·x ≥ 0
    constraints = np.hstack([simplex, positive, np.eye(t + 1)])
    bounds = np.concatenate([[1.0, -offset], np.zeros(t + 1)])
    try:
        x = quadprog.solve_qp(g, -gradient, constraints, bounds, 1)[0]
    except ValueError as error:
        raise SolverError(f"FORUM: quadprog failed on the QP ({error})") from error
    w = np.maximum(x[:t], 0.0)
    return np.append(w, max(float(offset + lift[t] @ x), 0.0) / norm)


@BALANCERS.register(
    "forum",
    "FORUM: one first-order step of weights and model on the validation losses' min-norm direction, "
    "constrained to keep the lower-level gap falling.",
    "Ye, Lin, Liu et al., A First-Order Multi-Gradient Algorithm for Multi-Objective Bi-Level Optimization, ECAI 2024",
)
class FORUM(BilevelBalancer):
    """FORUM (Ye et al. 2024), as LibMTL's ``bacth_forward_FORUM``. Upper level: the T validation losses
    ``F_t(ω)``; lower level: ``f(ξ, ω) = Σ_t softmax(ξ)_t L_t(ω)`` on the training batch. FORUM rewrites the
    lower level as the constraint ``q(ξ, ω) = f(ξ, ω) − f(ξ, ω^K) ≤ 0``, ``ω^K`` being ``inner_steps`` SGD
    steps (lr ``inner_lr``) on ``f`` from ``ω``, and moves ``z = (ξ, ω)`` together along
    ``d = Σ_t λ_t ĝ_t + ν g_q``: ``ĝ_t = ∇_ω F_t / ‖∇_ω F_t‖`` (zero on ``ξ``; a zero gradient stays zero),
    ``g_q = ∇_z q`` (``ξ``-part ``J_softmaxᵀ [L(ω) − L(ω^K)]``, ``ω``-part ``∇_ω f``). With
    ``π_t = φ − ⟨g_q, ĝ_t⟩/(‖g_q‖² + 10⁻⁸)`` (``phi`` φ), the weights ``w`` solve the QP of
    :func:`forum_weights`; ``λ`` is their running average ``λ ← λ + (e+1)^{-3/4}(w − λ)`` (``e`` the epoch,
    as LibMTL; ``λ`` starts at 0) and ``ν = max(Σ_t λ_t π_t, 0)``.

    Here ``ξ`` takes one Adam step (``outer_lr``) along ``ν g_q``'s ``ξ``-part; the training step weights the
    losses by ``ν·softmax(ξ)`` (the weights before that step, as LibMTL updates both at once) and adds
    ``Σ_t λ_t ĝ_t``, so the model moves along ``d``'s ``ω``-part with the trainer's optimiser. The outer batch
    comes from the validation split (LibMTL draws a second training batch). LibMTL stops the inner loop when
    the weighted loss passes 10⁵; here a non-finite inner loss is an error. Extra cost per step:
    ``inner_steps + 2`` forward and ``inner_steps + T`` backward passes.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("logits", "optimizer_state", "lambdas")

    def __init__(self, inner_lr: float = 0.1, inner_steps: int = 5, phi: float = 0.1, outer_lr: float = 1e-3) -> None:
        super().__init__(outer_lr)
        if not inner_lr > 0:
            raise ConfigError(f"balancer.inner_lr must be > 0, got {inner_lr}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ConfigError(f"balancer.inner_steps must be an integer >= 1, got {inner_steps!r}")
        if not phi > 0:
            raise ConfigError(f"balancer.phi must be > 0, got {phi}")
        self.inner_lr, self.inner_steps, self.phi = float(inner_lr), inner_steps, float(phi)
        self.lambdas: Tensor | None = None
        self._step_weights: Tensor | None = None
        self._pending: Tensor | None = None

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        if self.lambdas is None:
            self.lambdas = torch.zeros(num_tasks, dtype=torch.float64)

    def meta_gradient(self, problem: BilevelProblem) -> Tensor:
        """``ν``·(``g_q``'s ``ξ``-part); also keeps the step's training weights and ``Σ_t λ_t ĝ_t``."""
        if self.lambdas is None:
            raise InternalError("FORUM.meta_gradient was called before setup(num_tasks)")
        params, weights = problem.parameters, self.task_weights()
        train = problem.train_losses(params)
        g_omega = gradients((weights.to(train) * train).sum(), params)
        inner = moved(params, g_omega, -self.inner_lr)
        for step in range(1, self.inner_steps):
            losses = problem.train_losses(inner)
            if not torch.isfinite(losses).all():
                raise ConfigError(
                    f"FORUM: the inner loop's losses are not finite at step {step}; lower balancer.inner_lr"
                )
            inner = moved(inner, gradients((weights.to(losses) * losses).sum(), inner), -self.inner_lr)
        with torch.no_grad():
            gap = train.detach().double().cpu() - problem.train_losses(inner).double().cpu()
        q_xi = self.softmax_jacobian().T @ gap
        q_omega = flat(g_omega).double()
        val = problem.val_losses(params)
        t = val.numel()
        rows = torch.stack([flat(gradients(val[i], params, retain_graph=i < t - 1)) for i in range(t)]).double()
        norms = rows.norm(dim=1, keepdim=True)
        rows = torch.where(norms > 0, rows / norms.clamp_min(torch.finfo(rows.dtype).tiny), 0.0)
        gramian = torch.empty(t + 1, t + 1, dtype=torch.float64)
        gramian[:t, :t] = (rows @ rows.T).cpu()
        gramian[:t, t] = gramian[t, :t] = (rows @ q_omega).cpu()
        gramian[t, t] = float(q_xi @ q_xi) + float((q_omega @ q_omega).cpu())
        squared = float(gramian[t, t]) + _Q_EPS
        pi = self.phi - gramian[:t, t] / squared
        w = forum_weights(gramian.numpy(), self.phi)
        rate = (problem.epoch + 1) ** -0.75
        self.lambdas = self.lambdas + rate * (torch.from_numpy(w[:t]) - self.lambdas)
        nu = max(float(self.lambdas @ pi), 0.0)
        self._step_weights = nu * weights
        self._pending = (self.lambdas.to(rows) @ rows).to(params[0].dtype)
        return nu * q_xi

    def take_gradient(self) -> Tensor | None:
        pending, self._pending = self._pending, None
        return pending

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        if self._step_weights is None:
            raise InternalError("FORUM.balance was called before its meta-step")
        if self._step_weights.numel() != losses.numel():
            raise ConfigError(f"FORUM has weights for {self._step_weights.numel()} tasks but got {losses.numel()}")
        return Update(weights=self._step_weights.to(device=losses.device, dtype=losses.dtype))
