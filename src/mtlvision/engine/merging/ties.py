"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, FlatRule, check_range


def trim(vectors: Tensor, density: float) -> Tensor:
    """Each row of ``vectors [T, P]`` with all but its ``density`` fraction of largest magnitudes set to 0."""
    if density >= 1.0:
        return vectors
    keep = max(1, math.ceil(density * vectors.shape[1]))
    top = vectors.abs().topk(keep, dim=1).indices
    return torch.zeros_like(vectors).scatter_(1, top, vectors.gather(1, top))


def elect_and_merge(vectors: Tensor) -> Tensor:
    """TIES' sign election by total mass and the disjoint mean of the entries that agree with it: ``[T, P] -> [P]``."""
    elected = vectors.sum(0).sign()
    agrees = (vectors.sign() == elected) & (vectors != 0)
    return (vectors * agrees).sum(0) / agrees.sum(0).clamp_min(1)


@MERGE_RULES.register(
    "ties",
    "TIES: trim each task vector to its top-k% magnitudes, elect a sign by total mass, disjoint mean",
    "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
)
@dataclass
class Ties(FlatRule):
    """TIES-merging with ``density`` = k (the fraction of each task vector kept, 0.2 in the paper) and
    ``scale`` = λ (1 in the paper's default)."""

    needs_base: ClassVar[bool] = True
    density: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_range("ties", "density", self.density, 0.0, 1.0)

    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        return base + self.scale * elect_and_merge(trim(experts - base, self.density))
