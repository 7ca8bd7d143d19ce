"""ConFIG: a conflict-free update with equal cosine to every task gradient (Liu et al. 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import gradient_norms, nonzero_tasks, pinv_psd, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError


@BALANCERS.register(
    "config",
    "ConFIG: the direction with equal cosine to every task gradient, scaled by the summed projections.",
    "Liu, Chen & Thuerey, ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks, 2024",
)
class ConFIG(GramianBalancer):
    """ConFIG (Liu et al. 2024, Eq. 2): ``d = (Σ_i g_iᵀ ĝ) ĝ`` with ``ĝ = unit([u_1 … u_T]^{+ᵀ} w)``,
    ``u_i = g_i/‖g_i‖`` and preferences ``w`` (default ones, as the paper).

    With ``U`` the matrix of unit gradients (rows), ``U⁺w = Uᵀ (UUᵀ)⁺ w`` and ``UUᵀ = N⁻¹KN⁻¹``, so ``ĝ``
    and ``d`` are combinations of the task gradients computable from ``K``. Zero gradients have no unit
    vector and are left out of ``U`` (torchjd maps them to 0 likewise). The pseudo-inverse cuts eigenvalues
    relative to the Gramian's own precision (:func:`~._solvers.pinv_psd`). The weights do not depend on
    the scale of ``K``, which is rescaled by a power of two first.
    """

    def __init__(self, pref_vector: Sequence[float] | None = None) -> None:
        super().__init__()
        self.pref_vector = None if pref_vector is None else [float(p) for p in pref_vector]

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        if self.pref_vector is not None and len(self.pref_vector) != t:
            raise ConfigError(f"balancer.pref_vector has {len(self.pref_vector)} values but there are {t} tasks")
        prefs = np.ones(t) if self.pref_vector is None else np.asarray(self.pref_vector)
        gramian, _ = scaled(gramian)
        active = nonzero_tasks(gramian)
        weights = np.zeros(t)
        if not active.any():
            return weights
        norms = gradient_norms(gramian)[active]
        unit_gramian = gramian[np.ix_(active, active)] / np.outer(norms, norms)
        beta = pinv_psd(unit_gramian) @ prefs[active]  # ĝ ∝ Σ β_i u_i
        length_sq = float(beta @ unit_gramian @ beta)
        if length_sq <= 0.0:
            return weights
        coeffs = beta / norms / np.sqrt(length_sq)  # ĝ = Σ coeffs_i g_i, a unit vector
        projection_sum = float(gramian[:, active].sum(axis=0) @ coeffs)  # Σ_i g_iᵀ ĝ over all tasks
        weights[active] = projection_sum * coeffs
        return weights
