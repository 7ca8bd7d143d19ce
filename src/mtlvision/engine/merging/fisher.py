"""Fisher merging: each parameter the experts' mean weighted by their Fisher information (Matena & Raffel,
Merging Models with Fisher-Weighted Averaging, NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mtlvision.engine.merging.base import MERGE_RULES, DataRule, check_range
from mtlvision.errors import ConfigError


def fisher_average(experts: Tensor, fisher: Tensor, floor: float) -> Tensor:
    """Σ_t F_t θ_t / Σ_t F_t per entry of ``experts [T, ...]`` with Fishers ``[T, ...]`` raised to ``floor``."""
    weights = fisher.clamp_min(floor)
    return (weights * experts).sum(0) / weights.sum(0)


@MERGE_RULES.register(
    "fisher",
    "Fisher merging: per parameter, the experts' weights averaged with their diagonal Fisher information as weights",
    "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022",
)
@dataclass
class FisherMerging(DataRule):
    """θ = Σ_t F_t ⊙ θ_t / Σ_t F_t with F_t the diagonal empirical Fisher of expert t on ``samples`` training
    samples (per-sample gradients of its task loss, 32 by default), each entry at least ``floor`` (1e-6, as in
    the paper's code). With ``normalize`` each expert's Fisher is divided by its mean first, so that tasks
    whose losses have other scales weigh alike (an option of FusionBench; off in the paper)."""

    statistics: ClassVar[str | None] = "fisher"
    needs_labels: ClassVar[bool] = True
    samples: int = 32
    floor: float = 1e-6
    normalize: bool = False

    def __post_init__(self) -> None:
        self.check_samples("fisher")
        check_range("fisher", "floor", self.floor, 0.0, 1.0)

    def merge(
        self,
        experts: Mapping[str, Tensor],
        base: Mapping[str, Tensor] | None,
        statistics: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if statistics is None:
            raise ConfigError("fisher merging needs each expert's Fisher information (statistics 'fisher')")
        missing = [k for k in experts if k not in statistics]
        if missing:
            raise ConfigError(f"fisher merging: no Fisher information for {missing[0]!r}")
        fishers = dict(statistics)
        if self.normalize:
            total = torch.stack([fishers[k].flatten(1).sum(1) for k in experts]).sum(0)
            count = sum(fishers[k][0].numel() for k in experts)
            scale = (total / count).clamp_min(self.floor)  # [T]: each expert's mean Fisher entry
            fishers = {k: fishers[k] / scale.view(-1, *[1] * (fishers[k].dim() - 1)) for k in experts}
        return {k: fisher_average(v, fishers[k], self.floor) for k, v in experts.items()}
