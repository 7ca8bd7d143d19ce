"""PLE: progressive layered extraction (Tang et al., RecSys 2020)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import nn

from mtlvision.models.architectures._gates import GatedExperts, SoftmaxGate
from mtlvision.models.architectures._stages import require_at_least
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec
from mtlvision.models.architectures.registry import ARCHITECTURES


@ARCHITECTURES.register(
    "ple",
    "progressive layered extraction: stacked CGC levels over groups of backbone stages",
    "Tang et al., Progressive Layered Extraction (PLE), RecSys 2020",
)
@dataclass(frozen=True)
class PLE(ArchitectureSpec):
    """Stacked CGC levels, one per group of backbone stages, with a shared gate feeding the shared path.

    The stages after the first ``shared_stages`` are split into ``num_levels`` contiguous groups (earlier
    groups take any remainder). At each level, a task's experts read that task's gated output of the level
    below and the shared experts read the shared gate's mixture of every expert, as in the paper; the last
    level has no shared gate. Two levels is the depth the paper evaluates most.
    """

    name: ClassVar[str] = "ple"
    num_levels: int = 2
    task_experts: int = 1
    shared_experts: int = 1
    shared_stages: int = 0
    gate_pool_size: int = 8

    def __post_init__(self) -> None:
        require_at_least(self.name, "num_levels", self.num_levels, 1)
        require_at_least(self.name, "task_experts", self.task_experts, 1)
        require_at_least(self.name, "shared_experts", self.shared_experts, 1)
        require_at_least(self.name, "shared_stages", self.shared_stages, 0)
        require_at_least(self.name, "gate_pool_size", self.gate_pool_size, 1)

    def build(self, backbone_factory: Callable[[], nn.Module], task_names: Sequence[str]) -> Architecture:
        return GatedExperts(
            self.name,
            backbone_factory,
            task_names,
            shared_stages=self.shared_stages,
            num_levels=self.num_levels,
            task_experts=self.task_experts,
            shared_experts=self.shared_experts,
            gate_factory=SoftmaxGate,
            gate_pool_size=self.gate_pool_size,
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
