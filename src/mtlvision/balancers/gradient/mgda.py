"""MGDA: the min-norm point of the convex hull of the task gradients (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import gradient_norms, min_norm_frank_wolfe
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


@BALANCERS.register("mgda", "MGDA: min-norm convex combination of task gradients (Frank–Wolfe).", CITATION)
class MGDA(GramianBalancer):
    """MGDA on the parameter gradients: ``d = Σ α_t ĝ_t`` of minimum norm, ``α`` in the simplex.

    ``ĝ_t = g_t / n_t`` with the normalisation ``n_t`` of the authors' code: ``"l2"`` (‖g_t‖), ``"loss"``
    (L_t), ``"loss+"`` (L_t‖g_t‖) or ``"none"`` (the paper's Algorithm 2, default). The solver is the
    paper's Frank–Wolfe (best-pair start, exact line search, ``max_iter``, ``tol`` as in their code).

    The returned weights are ``α_t / n_t`` so that the update is exactly the min-norm element of the
    normalised gradients, i.e. the MGDA direction as the paper defines it. (The authors' code multiplies
    the *unnormalised* losses by ``α``, which changes the direction when ``n_t`` differ; we follow the paper.)
    Exact line search replaces the code's clipping of γ to [0.001, 0.999]. A task whose normaliser is
    zero (zero gradient or zero loss) is left unnormalised: then the min-norm point is 0, the paper's
    Pareto-stationarity certificate, and the update is zero.
    """

    supports_representation: ClassVar[bool] = True

    def __init__(self, normalization: str = "none", max_iter: int = 250, tol: float = 1e-5) -> None:
        super().__init__()
        if normalization not in NORMALISATIONS:
            raise ConfigError(
                f"balancer.normalization must be one of {', '.join(NORMALISATIONS)}, got {normalization!r}"
            )
        if max_iter < 1 or tol <= 0:
            raise ConfigError(f"balancer.max_iter must be ≥ 1 and balancer.tol > 0, got {max_iter}, {tol}")
        self.normalization = normalization
        self.max_iter = max_iter
        self.tol = tol

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        scale = NORMALISATIONS[self.normalization](gradient_norms(gramian), losses)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        normalised = gramian / np.outer(scale, scale)
        alpha = min_norm_frank_wolfe(normalised, self.max_iter, self.tol)
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
