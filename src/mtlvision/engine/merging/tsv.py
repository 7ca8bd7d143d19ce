"""TSV-M: task singular vectors, each task's top singular directions kept and decorrelated (Gargiulo et al.,
CVPR 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, TensorRule, as_matrices, check_range


def orthogonalise(matrix: Tensor) -> Tensor:
    """The orthogonal matrix nearest to ``matrix`` (Procrustes): P Qᵀ from its SVD P Σ Qᵀ."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def tsv_merge_matrices(vectors: Tensor) -> Tensor:
    """TSV-M of task matrices ``[T, m, n]``: each task's top ⌊r/T⌋ singular triplets (r = min(m, n), at least
    one), concatenated; the left and right singular vectors orthogonalised; U⊥ diag(σ) V⊥ᵀ."""
    count, rows, cols = vectors.shape
    keep = max(1, min(rows, cols) // count)
    us, ss, vs = [], [], []
    for matrix in vectors:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep])
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    return orthogonalise(u_cat) @ torch.diag(s_cat) @ orthogonalise(v_cat)


@MERGE_RULES.register(
    "tsv_m",
    "TSV-M: per layer, each task's top 1/T singular vectors, decorrelated by orthogonalisation, then summed",
    "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
)
@dataclass
class TaskSingularVectors(TensorRule):
    """θ = θ_0 + α · TSV-M(Δ_1..Δ_T) per weight matrix (convolutions as ``[out, in·k·k]``); vectors (biases,
    normalisation) take the mean of the task vectors, as in the paper's code. ``alpha`` = α (1 in the paper)."""

    needs_base: ClassVar[bool] = True
    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_range("tsv_m", "alpha", self.alpha, 0.0, 10.0)

    def merge_tensor(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        vectors = experts - base
        matrices = as_matrices(vectors)
        merged = vectors.mean(0) if matrices is None else tsv_merge_matrices(matrices).view(base.shape)
        return base + self.alpha * merged
