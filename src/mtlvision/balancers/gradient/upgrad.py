"""UPGrad and DualProj: projections onto the dual cone of the task gradients (Quinton & Rey 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import normalise_gramian, project_weights_to_dual_cone
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError

CITATION = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv:2406.16232, 2024"


class _DualConeBalancer(GramianBalancer):
    """Shared set-up: preference vector (default ``1/T``), ``K`` normalised by its trace and regularised.

    ``norm_eps`` and ``reg_eps`` are torchjd's defaults: ``K / trace(K)`` (zero when the trace is below
    ``norm_eps``), plus ``reg_eps · I`` so that the QP is strictly convex even for rank-deficient ``G``
    (``reg_eps=0`` gives the exact projection but then needs linearly independent gradients).
    """

    def __init__(
        self, pref_vector: Sequence[float] | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
    ) -> None:
        super().__init__()
        if pref_vector is not None and any(p < 0 for p in pref_vector):
            raise ConfigError(f"balancer.pref_vector must be non-negative, got {list(pref_vector)}")
        if reg_eps < 0 or norm_eps < 0:
            raise ConfigError(f"balancer.reg_eps and norm_eps must be ≥ 0, got {reg_eps}, {norm_eps}")
        self.pref_vector = None if pref_vector is None else [float(p) for p in pref_vector]
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def _prefs(self, t: int) -> np.ndarray:
        if self.pref_vector is None:
            return np.full(t, 1.0 / t)
        if len(self.pref_vector) != t:
            raise ConfigError(f"balancer.pref_vector has {len(self.pref_vector)} values but there are {t} tasks")
        return np.asarray(self.pref_vector)

    def _regularised(self, gramian: np.ndarray) -> np.ndarray:
        return normalise_gramian(gramian, self.norm_eps) + self.reg_eps * np.eye(gramian.shape[0])


@BALANCERS.register(
    "upgrad",
    "UPGrad: project every task gradient onto the dual cone of all of them, then combine.",
    CITATION,
)
class UPGrad(_DualConeBalancer):
    """UPGrad (Quinton & Rey 2024, Eq. 5): ``Σ_i u_i π_J(g_i)`` with ``π_J`` the projection onto the dual
    cone ``{x : Gx ≥ 0}``. Each projection is ``Gᵀ v_i`` with ``v_i = argmin_{v ≥ u_i e_i} vᵀKv``
    (their Prop. 1), a small QP solved with quadprog; the weights are ``Σ_i v_i``. The output satisfies
    ``Gd ≥ 0`` and does not depend on the task order.
    """

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        prefs = np.diag(self._prefs(gramian.shape[0]))
        return project_weights_to_dual_cone(self._regularised(gramian), prefs).sum(axis=0)


@BALANCERS.register(
    "dualproj",
    "DualProj: project the (preference-weighted) mean gradient onto the dual cone of the task gradients.",
    CITATION,
)
class DualProj(_DualConeBalancer):
    """DualProj (Quinton & Rey 2024, after Lopez-Paz & Ranzato's GEM, Eq. 11): ``π_J(Gᵀu)``, i.e.
    ``Gᵀ w`` with ``w = argmin_{w ≥ u} wᵀKw``, ``u`` the preference vector (default ``1/T``)."""

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return project_weights_to_dual_cone(self._regularised(gramian), self._prefs(gramian.shape[0]))[0]


