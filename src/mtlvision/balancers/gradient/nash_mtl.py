"""Nash-MTL: the Nash bargaining solution αᵢ(Kα)ᵢ = 1 (Navon et al., ICML 2022)."""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import linprog, minimize

from mtlvision.balancers.gradient._base import ExtraStateMixin, GramianBalancer
from mtlvision.balancers.gradient._solvers import SolverError, nonzero_tasks
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


def _feasible_start(gramian: np.ndarray) -> np.ndarray:
    """A point with ``α ≥ 1`` and ``Kα ≥ 1`` (hence ``αᵢ(Kα)ᵢ ≥ 1``), or SolverError when none exists."""
    t = gramian.shape[0]
    result = linprog(np.ones(t), A_ub=-gramian, b_ub=-np.ones(t), bounds=[(1.0, None)] * t, method="highs")
    if result.status != 0:
        raise SolverError(
            "Nash-MTL: no weights α > 0 make every task improve (no α with Kα > 0, e.g. two exactly "
            f"opposite gradients), so the bargaining solution does not exist ({result.message})"
        )
    return result.x


def nash_ccp(gramian: np.ndarray, start: np.ndarray, iterations: int) -> np.ndarray:
    """The paper's concave–convex procedure on a normalised ``K``: each step solves the convex problem
    ``min 1ᵀKα + ∇φ(α_prev)ᵀ(α − α_prev)`` s.t. ``αᵢ(Kα)ᵢ ≥ 1``, ``φ(α) = Σ log αᵢ + log(Kα)ᵢ``, with SLSQP.

    The stopping rules are those of the authors' code: ``‖Kα − 1/α‖ < 1e-3`` or a step below ``1e-6``.
    """
    alpha = start
    if not np.all(gramian @ alpha > 0) or not np.all(alpha > 0):
        alpha = _feasible_start(gramian)
    for _ in range(iterations):
        previous = alpha
        k_prev = gramian @ previous
        cost = gramian.sum(axis=0) + 1.0 / previous + gramian @ (1.0 / k_prev)
        result = minimize(
            lambda a: float(cost @ a),
            previous,
            jac=lambda a: cost,
            method="SLSQP",
            bounds=[(1e-12, None)] * len(previous),
            constraints=(
                {
                    "type": "ineq",
                    "fun": lambda a: a * (gramian @ a) - 1.0,
                    "jac": lambda a: np.diag(gramian @ a) + a[:, None] * gramian,
                },
            ),
            options={"ftol": 1e-12, "maxiter": 100},
        )
        if not result.success or not np.all(np.isfinite(result.x)):
            raise SolverError(f"Nash-MTL: the convex sub-problem failed ({result.message})")
        alpha = result.x
        if np.linalg.norm(gramian @ alpha - 1.0 / alpha) < 1e-3 or np.linalg.norm(alpha - previous) < 1e-6:
            break
    return alpha


@BALANCERS.register(
    "nash_mtl",
    "Nash-MTL: the Nash bargaining solution, weights with αᵢ(Kα)ᵢ = 1.",
    "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022",
)
class NashMTL(ExtraStateMixin, GramianBalancer):
    """Nash-MTL (Navon et al. 2022, Algorithm 1): weights ``α > 0`` solving ``αᵢ (Kα)ᵢ = 1``.

    As in the authors' code, ``K`` is normalised by its Frobenius norm, the solution is found with
    ``optim_niter`` steps of the concave–convex procedure warm-started at the previous step's solution,
    recomputed only every ``update_weights_every`` steps, and the update is clipped to norm ``max_norm``
    (0 disables it). Their code clips the shared parameters' gradient only; we scale the weights
    (task-specific parameters too), as torchjd does, which keeps the method Gramian-only. The returned
    ``α`` is for the true ``K`` (the normalised solution divided by ``√‖K‖_F``), so ``αᵢ(Kα)ᵢ = 1`` holds
    before clipping. Tasks with a zero gradient cannot satisfy the equation; they get weight 0.

    A solver failure raises :class:`SolverError`; with ``on_solver_failure="previous"`` the previous
    weights are reused with a warning (the authors' code does so silently).
    """

    _state_names: ClassVar[tuple[str, ...]] = ("step", "normalised_alpha", "alpha")

    def __init__(
        self,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        max_norm: float = 1.0,
        on_solver_failure: str = "raise",
    ) -> None:
        super().__init__()
        if update_weights_every < 1 or optim_niter < 1 or max_norm < 0:
            raise ConfigError(
                "balancer.update_weights_every and optim_niter must be ≥ 1 and max_norm ≥ 0, got "
                f"{update_weights_every}, {optim_niter}, {max_norm}"
            )
        if on_solver_failure not in ("raise", "previous"):
            raise ConfigError(f"balancer.on_solver_failure must be 'raise' or 'previous', got {on_solver_failure!r}")
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.max_norm = max_norm
        self.on_solver_failure = on_solver_failure
        self.step = 0
        self.normalised_alpha: torch.Tensor | None = None
        self.alpha: torch.Tensor | None = None

    def _solve(self, gramian: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        active = nonzero_tasks(gramian)
        alpha = np.zeros(t)
        if not active.any():
            return alpha
        sub = gramian[np.ix_(active, active)]
        norm = float(np.linalg.norm(sub))
        start = np.ones(t) if self.normalised_alpha is None else self.normalised_alpha.numpy()
        if start.shape != (t,):
            start = np.ones(t)
        solution = nash_ccp(sub / norm, np.where(start[active] > 0, start[active], 1.0), self.optim_niter)
        full = np.ones(t)
        full[active] = solution
        self.normalised_alpha = torch.from_numpy(full)
        alpha[active] = solution / np.sqrt(norm)
        return alpha

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        if self.alpha is None or self.step % self.update_weights_every == 0 or self.alpha.numel() != len(gramian):
            try:
                self.alpha = torch.from_numpy(self._solve(gramian))
            except SolverError as exc:
                if self.on_solver_failure == "raise" or self.alpha is None or self.alpha.numel() != len(gramian):
                    raise
                warnings.warn(f"{exc}; reusing the previous step's weights", RuntimeWarning, stacklevel=2)
        self.step += 1
        alpha = self.alpha.numpy()
        if self.max_norm > 0:
            norm = np.sqrt(max(alpha @ gramian @ alpha, 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha
