"""FairGrad: α-fair resource allocation among tasks (Ban & Ji, ICML 2024)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import SolverError, nonzero_tasks, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "fairgrad",
    "FairGrad: weights of the α-fair allocation, (Kw)ᵢ = wᵢ^(-1/α).",
    "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024",
)
class FairGrad(GramianBalancer):
    """FairGrad (Ban & Ji 2024): ``d = Gᵀw`` with ``w > 0`` solving ``K w = w^{-1/α}`` (element-wise), the
    optimality condition of ``max_d Σ_i (g_iᵀd)^{1-α}/(1-α)``; ``α = 1`` is proportional fairness (the
    Nash-MTL equation), ``α → ∞`` max–min fairness. Solved with scipy's ``least_squares`` from ``w = 1/T``
    like the authors' code, on ``K/trace(K)`` and rescaled back (``w ∝ s^{-α/(1+α)}`` for ``K → sK``); a
    result whose residual is not small raises :class:`SolverError`. ``alpha = 2.0`` is the value of the
    authors' experiment scripts (LibMTL defaults to 1.0). Tasks with a zero gradient have no solution and
    get weight 0.
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
        k = sub / trace
        n = int(active.sum())

        def residual(w: np.ndarray) -> np.ndarray:
            return k @ w - np.power(w, -1.0 / self.alpha)

        def jacobian(w: np.ndarray) -> np.ndarray:
            return k + np.diag(np.power(w, -1.0 / self.alpha - 1.0) / self.alpha)

        result = least_squares(
            residual, np.full(n, 1.0 / n), jac=jacobian, bounds=(0.0, np.inf), xtol=1e-12, ftol=1e-12, gtol=1e-12
        )
        relative = np.abs(result.fun) / np.power(result.x, -1.0 / self.alpha)
        if result.status <= 0 or not np.all(np.isfinite(result.x)) or relative.max() > self.residual_tol:
            raise SolverError(
                f"FairGrad: no weights solve (Kw)ᵢ = wᵢ^(-1/α) (largest relative residual {relative.max():.2e}, "
                f"{result.message}); the gradients may conflict so that some task cannot improve"
            )
        exponent = -self.alpha / (1.0 + self.alpha)  # w ∝ s^exponent for K → sK; s = power · trace
        weights[active] = result.x * trace**exponent * power**exponent
        return weights
