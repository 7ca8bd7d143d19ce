"""CGC: customized gate control (Tang et al., RecSys 2020), the single-level form of PLE."""

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
    "cgc",
    "customized gate control: task-specific and shared experts, one gate per task",
    "Tang et al., Progressive Layered Extraction (PLE), RecSys 2020",
)
@dataclass(frozen=True)
class CGC(ArchitectureSpec):
    """Task-specific and shared experts; each task's softmax gate mixes its own experts and the shared ones.

    Experts are copies of the backbone's stages after the first ``shared_stages`` (0: full copies, as in
    LibMTL). Shared experts are shared parameters; a task's experts and gates serve that task alone.
    """

    name: ClassVar[str] = "cgc"
    task_experts: int = 1
    shared_experts: int = 1
    shared_stages: int = 0
    gate_pool_size: int = 8

    def __post_init__(self) -> None:
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
            num_levels=1,
            task_experts=self.task_experts,
            shared_experts=self.shared_experts,
            gate_factory=SoftmaxGate,
            gate_pool_size=self.gate_pool_size,
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
