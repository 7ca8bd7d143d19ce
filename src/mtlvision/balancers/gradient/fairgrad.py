"""FairGrad: α-fair resource allocation among tasks (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import numpy as np

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import SolverError, min_norm_weights, nonzero_tasks, precision, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


def fair_weights(gramian: np.ndarray, alpha: float, max_iter: int = 200) -> tuple[np.ndarray, float]:
    """``w > 0`` with ``(Kw)ᵢ = wᵢ^(-1/α)`` for a Gramian of non-zero gradients, and the largest relative
    residual ``|(Kw)ᵢ − wᵢ^(-1/α)| / wᵢ^(-1/α)``.

    ``w`` is the minimiser of the strictly convex ``f(w) = ½wᵀKw − Σᵢ φ(wᵢ)`` with ``φ' = w^(-1/α)``
    (``φ = log`` for ``α = 1``), found by Newton's method with a backtracking line search that keeps
    ``w > 0``. Newton's iterates do not change under a rescaling of the variables, so tasks whose gradients
    differ by orders of magnitude cost nothing; the Newton system is solved in the variables ``w/w_k``
    (``S(K + diag(φ''))S`` with ``S = diag(w)``), whose matrix has a diagonal bounded below.
    """
    t = gramian.shape[0]
    k = gramian / float(np.trace(gramian))
    power = -1.0 / alpha

    def objective(w: np.ndarray) -> tuple[float, float]:
        """``f(w)`` and the round-off of computing it (near the minimum, decreases are below it)."""
        quadratic = 0.5 * float(w @ k @ w)
        barrier = float(np.log(w).sum()) if alpha == 1.0 else float((w ** (1.0 + power)).sum() / (1.0 + power))
        size = 0.5 * float(w @ np.abs(k) @ w) + abs(barrier)  # the terms' magnitude: wᵀKw cancels a lot
        return quadratic - barrier, 64.0 * t * float(np.finfo(np.float64).eps) * size

    ones = np.ones(t)
    curvature = float(ones @ k @ ones)
    w = ones * (t / curvature) ** (alpha / (1.0 + alpha)) if curvature > 0 else ones  # best multiple of 1
    value, _ = objective(w)
    for _ in range(max_iter):
        target = w**power
        gradient = k @ w - target
        if np.all(np.abs(gradient) <= 1e-13 * target):
            break
        system = w[:, None] * k * w[None, :] + np.diag(-power * w * target)  # S (K + diag(-φ'')) S
        try:
            relative = np.linalg.solve(system, w * gradient)  # the Newton step divided by w
        except np.linalg.LinAlgError:
            relative = np.linalg.lstsq(system, w * gradient, rcond=None)[0]
        decrease = float(gradient @ (w * relative))
        if not decrease > 0:
            break
        # Armijo backtracking on f inside w > 0; near the minimum, where f's decrease drowns in its round-off,
        # a step that halves the relative residual is taken instead
        residual = float(np.max(np.abs(gradient) / target))
        step = 1.0
        while step >= 1e-12:
            if np.all(relative * step < 1.0):
                trial = w * (1.0 - step * relative)
                candidate, roundoff = objective(trial)
                if candidate <= value - 1e-4 * step * decrease:
                    break
                trial_target = trial**power
                trial_residual = float(np.max(np.abs(k @ trial - trial_target) / trial_target))
                if candidate <= value + roundoff and trial_residual <= 0.5 * residual:
                    break
            step *= 0.5
        if step < 1e-12:
            break
        w = w * (1.0 - step * relative)
        value = candidate
    target = w**power
    return w, float(np.max(np.abs(k @ w - target) / target))


@BALANCERS.register(
    "fairgrad",
    "FairGrad: weights of the α-fair allocation, (Kw)ᵢ = wᵢ^(-1/α).",
    "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024",
)
class FairGrad(GramianBalancer):
    """FairGrad (Ban & Ji 2024): ``d = Gᵀw`` with ``w > 0`` solving ``K w = w^{-1/α}`` (element-wise), the
    optimality condition of ``max_d Σ_i (g_iᵀd)^{1-α}/(1-α)``; ``α = 1`` is proportional fairness (the
    Nash-MTL equation), ``α → ∞`` max–min fairness. ``alpha = 2.0`` is the value of the authors' experiment
    scripts (LibMTL defaults to 1.0). Tasks with a zero gradient have no solution and get weight 0.

    The authors' code solves the equation with scipy's ``least_squares`` from ``w = 1/T``, which stalls far
    from the solution when the tasks' gradients differ by orders of magnitude (torchjd, which does the same,
    then returns weights with residuals of 30–97 %). We minimise the convex function whose stationarity
    condition the equation is, by Newton's method (:func:`fair_weights`), on ``K/trace(K)`` and rescale back
    (``w ∝ s^{-α/(1+α)}`` for ``K → sK``). A solution exists exactly when no convex combination of the
    gradients is zero; :class:`SolverError` is raised when there is none (saying so) or when the relative
    residual stays above ``residual_tol``.
    """

    def __init__(self, alpha: float = 2.0, residual_tol: float = 1e-4) -> None:
        super().__init__()
        if alpha <= 0:
            raise ConfigError(f"balancer.alpha must be positive, got {alpha}")
        self.alpha = alpha
        self.residual_tol = residual_tol

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        weights = np.zeros(t)
        active = nonzero_tasks(gramian)
        if not active.any():
            return weights
        sub, power = scaled(gramian[np.ix_(active, active)])  # K = power · sub, power a power of two
        trace = float(np.trace(sub))
        solution, residual = fair_weights(sub, self.alpha)
        if not np.all(np.isfinite(solution)) or not residual <= self.residual_tol:
            norms = np.sqrt(np.diag(sub))
            unit = sub / norms[:, None] / norms[None, :]
            u = min_norm_weights(unit)
            min_norm = float(np.sqrt(max(u @ unit @ u, 0.0)))
            if min_norm <= np.sqrt(16.0 * len(u) * precision(gramian)):
                raise SolverError(
                    "FairGrad: no weights solve (Kw)ᵢ = wᵢ^(-1/α): a convex combination of the task gradients is "
                    f"zero (up to round-off; its norm is {min_norm:.1e} of theirs), so no update improves every task"
                )
            raise SolverError(
                f"FairGrad: Newton's method stopped at a largest relative residual of {residual:.2e} > "
                f"residual_tol = {self.residual_tol:g} although a solution exists (the smallest convex "
                f"combination of the unit gradients has norm {min_norm:.1e} > 0)"
            )
        exponent = -self.alpha / (1.0 + self.alpha)  # w ∝ s^exponent for K → sK; s = power · trace
        weights[active] = solution * trace**exponent * power**exponent
        return weights
