"""Aligned-MTL: align the principal components of the task gradients (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from mtlvision.balancers.gradient._base import GramianBalancer
from mtlvision.balancers.gradient._solvers import eigenvalue_cutoff, precision, scaled
from mtlvision.balancers.registry import BALANCERS
from mtlvision.errors import ConfigError

CITATION = "Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023"

_SCALES: dict[str, Callable[[np.ndarray], Any]] = {"min": lambda lam: lam[-1], "median": np.median, "rmse": np.mean}


def balance_transformation(gramian: np.ndarray, scale_mode: str = "min") -> np.ndarray:
    """``B`` [T, T] with ``Ĝ = B G`` the aligned gradients: ``B = √λ_min · V Λ^{-1/2} Vᵀ`` on the range of ``K``.

    ``K = VΛVᵀ``; eigenvalues at or below ``T · eps · λ_max`` are treated as zero (the rank cut of the
    authors' code), with ``eps`` the precision of the Gramian's own dtype (:func:`~._solvers.precision`:
    float32's for the engine's default Gramian, float64's for a float64 one), so
    ``Ĝ Ĝᵀ = λ_min · V_r V_rᵀ``, i.e. ``λ_min · I`` when ``G`` has full row rank. ``B`` does not change when
    ``K`` is scaled, so it is computed on the power-of-two rescaled ``K`` (no overflow for huge gradients).
    """
    k, _ = scaled(np.asarray(gramian))
    eigenvalues, vectors = np.linalg.eigh(k)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    rank = int((eigenvalues > eigenvalue_cutoff(eigenvalues, k.shape[0], precision(gramian))).sum())
    if rank == 0:
        return np.zeros_like(k)
    eigenvalues, vectors = eigenvalues[:rank], vectors[:, :rank]
    scale = float(_SCALES[scale_mode](eigenvalues))
    return np.sqrt(scale) * (vectors / np.sqrt(eigenvalues)) @ vectors.T


@BALANCERS.register(
    "aligned_mtl",
    "Aligned-MTL: rescale the gradients' principal components to equal size (condition number 1).",
    CITATION,
)
class AlignedMTL(GramianBalancer):
    """Aligned-MTL (Senushkin et al. 2023, Algorithm 1): ``d = Ĝᵀ w = Gᵀ Bᵀ w`` with ``B`` from
    :func:`balance_transformation` and task preferences ``w`` (default ``1/T``, as torchjd; the authors'
    code sums, i.e. ``w = 1``, a factor ``T`` on the step). ``scale_mode="min"`` is the paper's ``λ_min``;
    ``"median"`` and ``"rmse"`` are the code's alternatives.
    """

    supports_representation: ClassVar[bool] = True

    def __init__(self, pref_vector: Sequence[float] | None = None, scale_mode: str = "min") -> None:
        super().__init__()
        if scale_mode not in _SCALES:
            raise ConfigError(f"balancer.scale_mode must be one of {', '.join(_SCALES)}, got {scale_mode!r}")
        self.pref_vector = None if pref_vector is None else [float(p) for p in pref_vector]
        self.scale_mode = scale_mode

    def weights_from_gramian(self, gramian: np.ndarray, losses: np.ndarray) -> np.ndarray:
        t = gramian.shape[0]
        if self.pref_vector is not None and len(self.pref_vector) != t:
            raise ConfigError(f"balancer.pref_vector has {len(self.pref_vector)} values but there are {t} tasks")
        prefs = np.full(t, 1.0 / t) if self.pref_vector is None else np.asarray(self.pref_vector)
        return balance_transformation(gramian, self.scale_mode).T @ prefs


@BALANCERS.register(
    "aligned_mtl_ub",
    "Aligned-MTL-UB: Aligned-MTL on the gradients of the shared representation.",
    CITATION,
)
class AlignedMTLUB(AlignedMTL):
    """Aligned-MTL-UB (Senushkin et al. 2023, Sec. 4.3): Aligned-MTL on the shared representation's
    gradients; ``prefers_representation`` tells the trainer to run it in representation mode."""

    prefers_representation: ClassVar[bool] = True
