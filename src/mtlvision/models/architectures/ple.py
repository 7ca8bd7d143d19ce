"""PLE: progressive layered extraction (Tang et al., RecSys 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mtlvision.models.architectures._gates import ExpertLayout, GatedExpertsSpec
from mtlvision.models.architectures.registry import ARCHITECTURES


@ARCHITECTURES.register(
    "ple",
    "progressive layered extraction: stacked CGC levels over groups of backbone stages",
    "Tang et al., Progressive Layered Extraction (PLE), RecSys 2020",
)
@dataclass(frozen=True, repr=False)
class PLE(GatedExpertsSpec):
    """Stacked CGC levels, one per group of backbone stages, with a shared gate feeding the shared path.

    The stages after the first ``shared_stages`` are split into ``num_levels`` contiguous groups (earlier
    groups take any remainder). At each level, a task's experts read that task's gated output of the level
    below and the shared experts read the shared gate's mixture of every expert, as in the paper; the last
    level has no shared gate. Two levels is the depth the paper evaluates most.
    """

    name: ClassVar[str] = "ple"
    minimums: ClassVar[dict[str, int]] = {"num_levels": 1, "task_experts": 1, "shared_experts": 1}
    num_levels: int = 2
    task_experts: int = 1
    shared_experts: int = 1

    def layout(self) -> ExpertLayout:
        return ExpertLayout(
            num_levels=self.num_levels, task_experts=self.task_experts, shared_experts=self.shared_experts
        )
