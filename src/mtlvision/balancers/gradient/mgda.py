"""MGDA: the min-norm point of the convex hull of the task gradients (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import gradient_norms, min_norm_frank_wolfe, min_norm_weights, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError

CITATION = "Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018"


def _l2(norms: np.ndarray, losses: np.ndarray) -> np.ndarray:
    return norms


def _loss(norms: np.ndarray, losses: np.ndarray) -> np.ndarray:
    return losses


def _loss_plus(norms: np.ndarray, losses: np.ndarray) -> np.ndarray:
    return losses * norms


def _none(norms: np.ndarray, losses: np.ndarray) -> np.ndarray:
    return np.ones_like(norms)


#: the gradient normalisations of the authors' code: g_t is divided by this factor before the solver.
NORMALISATIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "l2": _l2,
    "loss": _loss,
    "loss+": _loss_plus,
    "none": _none,
}


#: how the min-norm problem is solved: exactly (default) or by the authors' Frank–Wolfe (inexact).
SOLVERS = ("exact", "frank_wolfe")


@BALANCERS.register("mgda", "MGDA: the min-norm convex combination of the task gradients.", CITATION)
class MGDA(GramianBalancer):
    """MGDA on the parameter gradients: ``d = Σ α_t ĝ_t`` of minimum norm, ``α`` in the simplex.

    ``ĝ_t = g_t / n_t`` with the normalisation ``n_t`` of the authors' code: ``"l2"`` (‖g_t‖), ``"loss"``
    (L_t), ``"loss+"`` (L_t‖g_t‖) or ``"none"`` (the paper's Algorithm 2, default).

    ``solver="exact"`` (default) returns the min-norm element itself, to round-off: an active-set solve of
    the quadratic programme over the simplex on the Gramian (:func:`~._solvers.min_norm_weights`), finite
    and exact also for linearly dependent gradients; at T = 3 it costs tens of microseconds.
    ``solver="frank_wolfe"`` is the paper's solver (best-pair start, exact line search, stopping when the
    weights move by less than ``tol`` in L1 or after ``max_iter`` steps, the authors' ``MAX_ITER = 250`` and
    ``STOP_CRIT = 1e-5``): it is **inexact** — with those settings its point can be several percent of the
    gradients' norm away from the min-norm element (3 % measured at T = 10 in 10 dimensions), so the update
    may even conflict with a task that the exact one does not. ``max_iter`` and ``tol`` apply to it only.

    The returned weights are ``α_t / n_t`` so that the update is the min-norm element of the normalised
    gradients, i.e. the MGDA direction as the paper defines it. (The authors' code multiplies the
    *unnormalised* losses by ``α``, which changes the direction when ``n_t`` differ; we follow the paper.)
    A task whose normaliser is zero (zero gradient or zero loss) is left unnormalised: then the min-norm
    point is 0, the paper's Pareto-stationarity certificate, and the update is zero. The weights do not
    depend on the scale of ``K``, which is rescaled by a power of two before solving.
    """

    supports_representation: ClassVar[bool] = True

    def __init__(
        self, normalization: str = "none", solver: str = "exact", max_iter: int = 250, tol: float = 1e-5
    ) -> None:
        super().__init__()
        if normalization not in NORMALISATIONS:
            raise ConfigError(
                f"balancer.normalization must be one of {', '.join(NORMALISATIONS)}, got {normalization!r}"
            )
        if solver not in SOLVERS:
            raise ConfigError(f"balancer.solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if max_iter < 1 or tol <= 0:
            raise ConfigError(f"balancer.max_iter must be ≥ 1 and balancer.tol > 0, got {max_iter}, {tol}")
        self.normalization = normalization
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        scale = NORMALISATIONS[self.normalization](gradient_norms(gramian), losses)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        normalised, _ = scaled(gramian / scale[:, None] / scale[None, :])  # no overflow in an outer product
        if self.solver == "exact":
            alpha = min_norm_weights(normalised)
        else:
            alpha = min_norm_frank_wolfe(np.asarray(normalised), self.max_iter, self.tol)
        return alpha / scale


@BALANCERS.register(
    "mgda_ub",
    "MGDA-UB: MGDA on the gradients of the shared representation (an upper bound, one backward).",
    CITATION,
)
class MGDAUB(MGDA):
    """MGDA-UB (Sener & Koltun 2018, Sec. 3.3): MGDA on ``∂L_t/∂z`` for the shared representation ``z``.

    The solver is the same as :class:`MGDA`; ``prefers_representation`` tells the trainer to run it in
    representation mode, where the engine hands it the representation gradients.
    """

    prefers_representation: ClassVar[bool] = True
