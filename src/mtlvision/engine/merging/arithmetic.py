"""Averaging and task arithmetic: the two linear rules every other rule is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, FlatRule


@MERGE_RULES.register(
    "average",
    "the mean of the experts' weights",
    "Wortsman et al., Model soups, ICML 2022; Matena & Raffel, Merging Models with Fisher-Weighted Averaging, "
    "NeurIPS 2022 (isotropic case)",
)
@dataclass
class WeightAverage(FlatRule):
    """θ = (1/T) Σ_t θ_t."""

    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor:
        return experts.mean(0)


@MERGE_RULES.register(
    "task_arithmetic",
    "the base plus the scaled sum of the task vectors θ_t - θ_0",
    "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
)
@dataclass
class TaskArithmetic(FlatRule):
    """θ = θ_0 + λ Σ_t (θ_t − θ_0); the paper picks λ on held-out data, 0.3 is its usual value."""

    needs_base: ClassVar[bool] = True
    scale: float = 0.3

    def __call__(self, experts: Tensor, base: Tensor | None) -> Tensor:
        assert base is not None
        return base + self.scale * (experts - base).sum(0)
