"""DARE: drop and rescale task vectors before merging them (Yu et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, FlatRule, check_range
from mtlvision.engine.merging.ties import elect_and_merge, trim

CITATION = (
    "Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024"
)


def drop_and_rescale(vectors: Tensor, drop: float, seed: int) -> Tensor:
    """DARE on ``vectors [T, P]``: each entry zeroed with probability ``drop`` (p), the rest divided by 1 − p,
    so that every task vector keeps its expectation; the masks come from a generator seeded with ``seed``."""
    if drop == 0.0:
        return vectors
    generator = torch.Generator().manual_seed(int(seed))
    keep = torch.rand(vectors.shape, generator=generator) >= drop
    return vectors * keep.to(vectors.device) / (1.0 - drop)


@MERGE_RULES.register(
    "dare_task_arithmetic",
    "DARE: drop a fraction p of each task vector at random, rescale the rest by 1/(1-p), then task arithmetic",
    CITATION,
)
@dataclass
class DareTaskArithmetic(FlatRule):
    """θ = θ_0 + λ Σ_t DARE_p(θ_t − θ_0), with ``drop`` = p (0.5), ``scale`` = λ (0.3) and the mask ``seed``."""

    needs_base: ClassVar[bool] = True
    drop: float = 0.5
    scale: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("dare_task_arithmetic", "drop", self.drop, 0.0, 1.0, open_low=False, open_high=True)

    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        return base + self.scale * drop_and_rescale(experts - base, self.drop, self.seed).sum(0)


@MERGE_RULES.register(
    "dare_ties",
    "DARE then TIES: task vectors dropped and rescaled, optionally trimmed, sign elected by mass, disjoint mean",
    CITATION + "; Yadav et al., TIES-Merging, NeurIPS 2023",
)
@dataclass
class DareTies(FlatRule):
    """θ = θ_0 + λ · TIES(DARE_p(θ_t − θ_0)): ``drop`` = p (0.5), TIES' trim ``density`` (1: DARE alone
    sparsifies, as in DARE's experiments), ``scale`` = λ (1) and the mask ``seed``."""

    needs_base: ClassVar[bool] = True
    drop: float = 0.5
    density: float = 1.0
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("dare_ties", "drop", self.drop, 0.0, 1.0, open_low=False, open_high=True)
        check_range("dare_ties", "density", self.density, 0.0, 1.0)

    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        vectors = drop_and_rescale(experts - base, self.drop, self.seed)
        return base + self.scale * elect_and_merge(trim(vectors, self.density))
