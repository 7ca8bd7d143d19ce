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

    The QPs are solved on ``K̃ = K / trace(K) + reg_eps · I`` (torchjd's defaults ``norm_eps = reg_eps =
    1e-4``), which is what the two hyper-parameters do:

    - ``reg_eps > 0`` makes the QP strictly convex, so quadprog solves it for rank-deficient ``G`` too. It
      is the exact dual-cone projection for the regularised Gramian, i.e. for the gradients augmented with
      ``√(reg_eps · trace K) · e_t`` in extra orthogonal coordinates, not for ``G``: with ``w`` the weights
      (``d = Gᵀw``), ``(Gd)_t ≥ −reg_eps · trace(K) · w_t`` for every task, with equality where the task's own
      constraint is slack (in every QP it enters). So ``Gd ≥ 0`` holds only up to that margin; it is negligible when
      the tasks' gradients have similar norms, but a task whose gradient is much smaller than the others can be
      conflicted by ``d`` (measured: at the defaults, a task 100× smaller at cosine −0.55 with another gets
      ``g_tᵀd < 0``; torchjd behaves the same).
    - ``reg_eps = 0`` gives the exact projection: ``Gd ≥ 0`` holds (to round-off), but the QP then needs
      ``K`` positive definite (linearly independent gradients) and fails otherwise.
    - ``norm_eps`` is an absolute threshold on ``trace(K) = Σ‖g_t‖²``: below it ``K̃`` is replaced by
      ``reg_eps · I`` alone, so the weights are the preferences and ``d`` the preference-weighted sum, with
      no projection at all (torchjd's rule). Set it to 0 for gradients that are small in absolute terms.
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
    cone ``{x : Gx ≥ 0}``. Each projection is ``Gᵀ v_i`` with ``v_i = argmin_{v ≥ u_i e_i} vᵀK̃v``
    (their Prop. 1), a small QP solved with quadprog; the weights are ``Σ_i v_i``. The output does not
    depend on the task order. It satisfies ``Gd ≥ 0`` exactly only with ``reg_eps = 0`` (linearly
    independent gradients); with the default regularisation, ``Gd ≥ −reg_eps · trace(K) · w`` (see
    :class:`_DualConeBalancer`), which a task with a much smaller gradient than the others can feel.
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
    ``Gᵀ w`` with ``w = argmin_{w ≥ u} wᵀK̃w``, ``u`` the preference vector (default ``1/T``). As for
    UPGrad, ``Gd ≥ 0`` holds exactly only with ``reg_eps = 0``; with the default regularisation
    ``Gd ≥ −reg_eps · trace(K) · w`` (see :class:`_DualConeBalancer`)."""

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        return project_weights_to_dual_cone(self._regularised(gramian), self._prefs(gramian.shape[0]))[0]
