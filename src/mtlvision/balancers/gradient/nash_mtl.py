"""Nash-MTL: the Nash bargaining solution αᵢ(Kα)ᵢ = 1 (Navon et al., ICML 2022)."""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import torch

from mtlvision.balancers.base import ExtraStateMixin
from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import SolverError, min_norm_weights, nonzero_tasks, precision, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


def unit_gramian(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K̃, n)``: the Gramian ``K̃ = N⁻¹KN⁻¹`` of the unit gradients (ones on its diagonal) and the norms
    ``n`` of the gradients, for ``K`` rescaled by a power of two (:func:`~._solvers.scaled`) so that neither
    overflows. All gradients must be non-zero."""
    k, s = scaled(gramian)
    norms = np.sqrt(np.diag(k))
    return k / norms[:, None] / norms[None, :], norms * np.sqrt(s)


def nash_weights(
    gramian: np.ndarray, start: np.ndarray | None = None, max_iter: int = 500, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """The ``α > 0`` with ``αᵢ(Kα)ᵢ = 1`` for every task (all gradients non-zero), and the unit-gradient
    solution ``β`` it came from (for a warm start).

    **Scale.** With ``N = diag(‖g_i‖)`` and ``α = N⁻¹β`` the equation becomes ``βᵢ(K̃β)ᵢ = 1`` for the
    Gramian ``K̃ = N⁻¹KN⁻¹`` of the unit gradients: solving that instead makes the solver blind to the
    gradients' sizes (one task's gradient 10⁻⁴ of another's costs nothing), and exact.

    **Solver.** ``β`` is the minimiser of the strictly convex, self-concordant
    ``f(β) = ½βᵀK̃β − Σᵢ log βᵢ`` (``∇f = K̃β − 1/β``), found by damped Newton steps (Nesterov &
    Nemirovski): with ``S = diag(β)`` and the residual ``r = β∘K̃β − 1``, the Newton step is
    ``Δ = S M⁻¹ r`` with ``M = I + SK̃S`` (eigenvalues ≥ 1, so its Cholesky solve is stable however
    ill-conditioned ``K`` is) and the decrement ``λ² = rᵀM⁻¹r``; the step ``Δ/(1+λ)`` (full once
    ``λ ≤ ¼``) keeps ``β > 0`` and converges globally, quadratically at the end. It stops when ``λ`` is
    negligible or the residual stops shrinking (round-off), and the result is accepted when every
    ``|rᵢ| ≤ tol``. Round-off bounds the computed residual by about ``eps·βᵢ Σⱼ|K̃ᵢⱼ|βⱼ``: ``10⁻¹⁰`` for
    ``cond(K) = 10⁸``, more only for gradients that nearly cancel (weights ``≳ 10⁴``); once a solution is
    known to exist (below), a residual within that bound is accepted too: ``β`` is then the solution to
    working precision (backward error at round-off), all that the Gramian's numbers determine.

    **Existence.** ``f`` is bounded below, and the solution exists, exactly when no convex combination of
    the gradients is zero (if ``Gᵀu = 0`` for some ``u ≥ 0``, ``u ≠ 0``, then ``Σ uᵢ(Kα)ᵢ = 0`` and not every
    ``(Kα)ᵢ`` can be positive). When Newton does not converge this is checked with the exact min-norm
    point of the unit gradients, and :class:`SolverError` says which of the two happened.
    """
    t = gramian.shape[0]
    corr, norms = unit_gramian(gramian)
    eps = float(np.finfo(np.float64).eps)
    usable = start is not None and start.shape == (t,) and bool(np.all(np.isfinite(start) & (start > 0)))
    beta = np.array(start, dtype=np.float64) if usable else np.ones(t)
    curvature = float(beta @ corr @ beta)
    if curvature > 0:
        beta = beta * np.sqrt(t / curvature)  # the best multiple of the start: f(cβ) is least at this c
    best = np.inf  # the smallest residual of the quadratic phase, to notice when round-off stops it
    stalled = 0
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007  (the count is reported after the loop)
        residual = beta * (corr @ beta) - 1.0
        largest = float(np.abs(residual).max())
        if not np.isfinite(largest) or largest <= 16.0 * t * eps:
            break
        m = np.eye(t) + beta[:, None] * corr * beta[None, :]
        try:
            factor = np.linalg.cholesky(m)
            step = np.linalg.solve(factor.T, np.linalg.solve(factor, residual))
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(m, residual, rcond=None)[0]
        decrement = float(np.sqrt(max(float(residual @ step), 0.0)))
        if decrement <= 0.25:  # quadratic phase: full steps, each should shrink the residual a lot
            stalled = stalled + 1 if largest > 0.5 * best else 0
            best = min(best, largest)
            if stalled >= 3:
                break
            beta = beta * (1.0 - step)
            if decrement < 1e-14:
                break
        else:
            beta = beta * (1.0 - step / (1.0 + decrement))
    residual = beta * (corr @ beta) - 1.0
    if np.all(np.isfinite(beta)) and np.all(beta > 0) and np.all(np.abs(residual) <= tol):
        return beta / norms, beta
    u = min_norm_weights(corr)
    min_norm = float(np.sqrt(max(u @ corr @ u, 0.0)))
    if min_norm <= np.sqrt(16.0 * t * precision(gramian)):
        combination = ", ".join(f"{w:.3g}" for w in u / norms / (u / norms).max())
        raise SolverError(
            "Nash-MTL: the bargaining solution does not exist: a convex combination of the task gradients is "
            f"zero (up to round-off: the weights [{combination}] on the gradients give a vector of "
            f"{min_norm:.1e} times their norms), so no update improves every task and no α > 0 solves "
            "αᵢ(Kα)ᵢ = 1. The tasks conflict exactly (e.g. two opposite gradients); a Pareto-stationary point "
            "has been reached"
        )
    # A solution exists. Where the gradients nearly cancel, the weights are huge and computing βᵢ(K̃β)ᵢ
    # cancels: its round-off, not the solver, bounds the residual. Within it, β is the solution to working
    # precision (its backward error is at round-off), the best a float64 Gramian determines.
    roundoff = 16.0 * t * eps * beta * (np.abs(corr) @ beta)
    finite = bool(np.all(np.isfinite(beta)) and np.all(beta > 0))
    if finite and np.all(np.abs(residual) <= np.maximum(tol, roundoff)):
        return beta / norms, beta
    raise SolverError(
        f"Nash-MTL: Newton's method stopped after {iterations} iterations with residual "
        f"{float(np.abs(residual).max()):.2e} > tol = {tol:g}, although a solution exists (the smallest convex "
        f"combination of the unit gradients has norm {min_norm:.1e} > 0); raise balancer.max_iter"
    )


@BALANCERS.register(
    "nash_mtl",
    "Nash-MTL: the Nash bargaining solution, weights with αᵢ(Kα)ᵢ = 1.",
    "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022",
)
class NashMTL(ExtraStateMixin, GramianBalancer):
    """Nash-MTL (Navon et al. 2022, Algorithm 1): weights ``α > 0`` solving ``αᵢ (Kα)ᵢ = 1``.

    As in the authors' code, the solution is warm-started at the previous step's, recomputed only every
    ``update_weights_every`` steps, and the update is clipped to norm ``max_norm`` (0 disables it). The
    returned ``α`` is for the true ``K``, so ``αᵢ(Kα)ᵢ = 1`` holds before clipping. Tasks with a zero
    gradient cannot satisfy the equation; they get weight 0. (The code normalises ``K`` by its Frobenius
    norm; we solve for the unit gradients, which also removes the differences of scale between tasks.)

    Two departures from the code, both measured or forced: (1) the paper approximates the solution with a
    concave–convex procedure (the code: at most ``optim_niter = 20`` cvxpy/ECOS solves, no cvxpy here);
    we compute the solution itself with a scale-free damped Newton method (:func:`nash_weights`), to a
    residual below ``tol`` or to round-off. It is exact where the CCP and general-purpose minimisers stall:
    L-BFGS-B, used here before, failed on 13 of 90 full-rank problems with ``cond(K) = 10⁸`` that Newton
    solves to 10⁻¹¹. (2) The code clips the shared parameters' gradient only; we scale the weights
    (task-specific parameters too), as torchjd does, which keeps the method Gramian-only. Without clipping
    the update has norm ``√T`` (``αᵀKα = Σᵢ αᵢ(Kα)ᵢ = T``).

    The weights are warm-started at the previous solution (kept in the checkpoint as
    ``normalised_alpha``, the solution for the unit gradients). :class:`SolverError` is raised only where
    no solution exists (some convex combination of the gradients is zero, the message says which) or
    Newton did not converge (it says so); with ``on_solver_failure="previous"`` the previous weights are
    reused with a warning (the authors' code does so silently).
    """

    _state_names: ClassVar[tuple[str, ...]] = ("step", "normalised_alpha", "alpha")

    def __init__(
        self,
        update_weights_every: int = 1,
        max_norm: float = 1.0,
        max_iter: int = 500,
        tol: float = 1e-6,
        on_solver_failure: str = "raise",
    ) -> None:
        super().__init__()
        if update_weights_every < 1 or max_iter < 1 or max_norm < 0 or tol <= 0:
            raise ConfigError(
                "balancer.update_weights_every and max_iter must be ≥ 1, max_norm ≥ 0 and tol > 0, got "
                f"{update_weights_every}, {max_iter}, {max_norm}, {tol}"
            )
        if on_solver_failure not in ("raise", "previous"):
            raise ConfigError(f"balancer.on_solver_failure must be 'raise' or 'previous', got {on_solver_failure!r}")
        self.update_weights_every = update_weights_every
        self.max_iter = max_iter
        self.tol = tol
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
        start = None if self.normalised_alpha is None else self.normalised_alpha.numpy()
        if start is not None and start.shape == (t,):
            start = start[active]
        solution, beta = nash_weights(gramian[np.ix_(active, active)], start, self.max_iter, self.tol)
        full = np.ones(t)
        full[active] = beta
        self.normalised_alpha = torch.from_numpy(full)
        alpha[active] = solution
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
            k, s = scaled(gramian)  # αᵀKα = (√s α)ᵀ (K/s) (√s α), without overflow
            root = alpha * np.sqrt(s)
            norm = np.sqrt(max(float(root @ k @ root), 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha
