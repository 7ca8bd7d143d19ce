"""Isotropic merging in the common subspace (Iso-C) and in common and task-specific subspaces (Iso-CTS):
Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, TensorRule, as_matrices, check_range
from mtlvision.engine.merging.tsv import orthogonalise

CITATION = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, ICML 2025"
)


def iso_c_matrices(vectors: Tensor) -> Tensor:
    """Iso-C of task matrices ``[T, m, n]``: the task-arithmetic sum U Σ Vᵀ with its spectrum flattened to its
    mean, σ̄ U Vᵀ."""
    u, s, vh = torch.linalg.svd(vectors.sum(0), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_matrices(vectors: Tensor, common_fraction: float) -> Tensor:
    """Iso-CTS of task matrices ``[T, m, n]``: the top ``common_fraction`` of the sum's singular directions, then
    for each task the top directions of what its matrix holds outside that common subspace, the rank r = min(m,
    n) shared equally; bases orthogonalised and the spectrum made isotropic at its mean."""
    count, rows, cols = vectors.shape
    rank = min(rows, cols)
    common = int(rank * common_fraction)
    per_task = round((rank - common) / count)
    if per_task * count > rank:
        per_task = rank // count
    common = rank - per_task * count
    u, s, vh = torch.linalg.svd(vectors.sum(0), full_matrices=False)
    u_c = u[:, :common]
    us, ss, vs = [u_c], [s[:common]], [vh[:common]]
    for matrix in vectors if per_task else []:
        specific = matrix - u_c @ (u_c.T @ matrix)
        u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vs.append(vh_t[:per_task])
    spectrum = torch.cat(ss)
    return spectrum.mean() * (orthogonalise(torch.cat(us, 1)) @ orthogonalise(torch.cat(vs, 0)))


@MERGE_RULES.register(
    "iso_c",
    "Iso-C: per layer, the sum of the task vectors with a flat (isotropic) singular spectrum",
    CITATION,
)
@dataclass
class IsoC(TensorRule):
    """θ = θ_0 + α σ̄ U Vᵀ, with U Σ Vᵀ the SVD of Σ_t Δ_t per weight matrix (convolutions as ``[out, in·k·k]``);
    vectors take the mean of the task vectors, as in the paper's code. ``alpha`` = α (tuned on held-out data
    in the paper; 1 by default)."""

    needs_base: ClassVar[bool] = True
    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_range("iso_c", "alpha", self.alpha, 0.0, 10.0)

    def merge_tensor(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        vectors = experts - base
        matrices = as_matrices(vectors)
        merged = vectors.mean(0) if matrices is None else iso_c_matrices(matrices).view(base.shape)
        return base + self.alpha * merged


@MERGE_RULES.register(
    "iso_cts",
    "Iso-CTS: Iso-C over a common subspace plus each task's own directions outside it, isotropic spectrum",
    CITATION,
)
@dataclass
class IsoCTS(TensorRule):
    """Iso-CTS with ``common_fraction`` of the rank kept for the common subspace (0.8 in the paper) and
    ``alpha`` = α (1 by default); vectors take the mean of the task vectors."""

    needs_base: ClassVar[bool] = True
    common_fraction: float = 0.8
    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_range("iso_cts", "common_fraction", self.common_fraction, 0.0, 1.0, open_low=False)
        check_range("iso_cts", "alpha", self.alpha, 0.0, 10.0)

    def merge_tensor(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        vectors = experts - base
        matrices = as_matrices(vectors)
        if matrices is None:
            merged = vectors.mean(0)
        else:
            merged = iso_cts_matrices(matrices, self.common_fraction).view(base.shape)
        return base + self.alpha * merged
