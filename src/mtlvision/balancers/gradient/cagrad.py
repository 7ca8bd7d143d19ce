"""CAGrad: the best worst-case improvement within a ball around the mean gradient (Liu et al. 2021)."""

from __future__ import annotations

import numpy as np

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import conflict_averse_dual, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "cagrad",
    "CAGrad: maximise the worst task improvement in a ball of radius c‖g0‖ around the mean gradient.",
    "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021",
)
class CAGrad(GramianBalancer):
    """CAGrad (Liu et al. 2021, Algorithm 1): ``d = g0 + (√φ / ‖g_w‖) g_w`` with ``g0`` the mean gradient,
    ``φ = c²‖g0‖²`` and ``w = argmin_{w ∈ Δ} g_wᵀ g0 + √φ ‖g_w‖`` (the dual problem), solved with scipy's
    SLSQP from ``w = 1/T`` as in the authors' code. ``c = 0.4`` is the paper's NYUv2 setting; ``c = 0`` gives
    the mean gradient. The paper's update is used; ``rescale=True`` divides it by ``1 + c²`` as the authors'
    code does by default. When ``g_w`` vanishes (0 is in the gradients' convex hull, a Pareto-stationary
    point) the update is zero, as in torchjd.
    """

    def __init__(self, c: float = 0.4, rescale: bool = False) -> None:
        super().__init__()
        if c < 0:
            raise ConfigError(f"balancer.c must be non-negative, got {c}")
        self.c = c
        self.rescale = rescale

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        mean = np.full(t, 1.0 / t)
        gramian, _ = scaled(gramian)  # a power of two: exact, and no overflow in the trace below
        scale = float(np.trace(gramian)) / t
        if self.c == 0.0 or scale <= 0.0:
            return mean
        k = gramian / scale  # the weights are invariant to the scale of K; this keeps SLSQP well-posed
        sqrt_phi = self.c * np.sqrt(max(mean @ k @ mean, 0.0))
        w = conflict_averse_dual(k, 1.0, sqrt_phi, "CAGrad")
        gw_norm = np.sqrt(max(w @ k @ w, 0.0))
        if gw_norm < 1e-8:
            return np.zeros(t)
        weights = mean + (sqrt_phi / gw_norm) * w
        return weights / (1.0 + self.c**2) if self.rescale else weights
