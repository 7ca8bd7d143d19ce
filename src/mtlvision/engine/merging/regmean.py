"""RegMean: each linear layer the weights that best reproduce every expert's outputs on its own inputs (Jin
et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, DataRule, check_range
from mtlvision.errors import ConfigError


def regmean_matrix(weights: Tensor, grams: Tensor, alpha: float) -> Tensor:
    """W = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ, transposed back, for weights ``[T, out, d]`` and input Grams ``[T, d, d]``;
    G̃ = α G + (1 − α) diag(G) shrinks the off-diagonal entries (α = 1: the exact least-squares merge).

    Input dimensions that no sample of any expert reaches (a zero diagonal: e.g. a channel ReLU always
    zeroes) do not constrain W; they keep the experts' mean weight. On the others Σ G̃ is positive definite
    for α < 1 (a Cholesky solve); for α = 1 it may be singular and the least-squares solution is taken.
    """
    diagonal = torch.diag_embed(torch.diagonal(grams, dim1=1, dim2=2))
    shrunk = alpha * grams + (1 - alpha) * diagonal
    lhs = shrunk.sum(0).double()
    rhs = (shrunk @ weights.transpose(1, 2)).sum(0).double()
    merged = weights.double().mean(0).T.clone()  # [d, out]
    active = lhs.diagonal() > 0
    sub, target = lhs[active][:, active], rhs[active]
    if alpha < 1:
        merged[active] = torch.cholesky_solve(target, torch.linalg.cholesky(sub))
    else:
        merged[active] = torch.linalg.lstsq(sub, target, driver="gelsy").solution
    return merged.T.to(weights.dtype)


@MERGE_RULES.register(
    "regmean",
    "RegMean: per linear/conv layer, the weights minimising the distance to every expert's outputs on its inputs",
    "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
)
@dataclass
class RegMean(DataRule):
    """Per ``nn.Linear`` and one-group ``nn.Conv2d`` (its weight as ``[out, in·k·k]`` on unfolded patches):
    ``W = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ`` with G_t the Gram matrix of expert t's inputs to that layer over
    ``samples`` training samples (32) and ``alpha`` the off-diagonal scale (0.9; the paper tunes it in
    [0, 1]); every other parameter (biases, normalisation) is averaged, as in the paper. Needs no common
    start."""

    statistics: ClassVar[str | None] = "gram"
    samples: int = 32
    alpha: float = 0.9

    def __post_init__(self) -> None:
        self.check_samples("regmean")
        check_range("regmean", "alpha", self.alpha, 0.0, 1.0, open_low=False)

    def merge(
        self,
        experts: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None,
        statistics: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if statistics is None:
            raise ConfigError("regmean needs the Gram matrices of each expert's layer inputs (statistics 'gram')")
        merged = {}
        for key, stacked in experts.items():
            gram = statistics.get(key)
            if gram is None:
                merged[key] = stacked.mean(0)
                continue
            matrices = stacked.flatten(2)
            if gram.shape[1:] != (matrices.shape[2], matrices.shape[2]):
                raise ConfigError(
                    f"regmean: the Gram matrices of {key!r} are {tuple(gram.shape)}, weight {tuple(stacked.shape)}"
                )
            merged[key] = regmean_matrix(matrices, gram, self.alpha).view(stacked.shape[1:])
        return merged
