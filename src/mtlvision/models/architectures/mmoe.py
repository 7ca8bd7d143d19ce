"""MMoE: multi-gate mixture-of-experts (Ma et al., KDD 2018)."""

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
    "mmoe",
    "multi-gate mixture-of-experts: backbone-copy experts mixed per task and stage by softmax gates",
    "Ma et al., Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts, KDD 2018",
)
@dataclass(frozen=True)
class MMoE(ArchitectureSpec):
    """Experts shared by all tasks, mixed by one softmax gate per task (and per stage).

    ``num_experts`` experts, each a copy of the backbone's stages after the first ``shared_stages``
    (0: full backbone copies, as LibMTL does; 1: experts on top of one shared stem stage, far cheaper).
    The paper tunes the number of experts per data set; 4 is our default for image backbones, where
    each expert is a whole backbone. Experts are shared parameters; gates are task-specific.
    """

    name: ClassVar[str] = "mmoe"
    num_experts: int = 4
    shared_stages: int = 0
    gate_pool_size: int = 8

    def __post_init__(self) -> None:
        require_at_least(self.name, "num_experts", self.num_experts, 1)
        require_at_least(self.name, "shared_stages", self.shared_stages, 0)
        require_at_least(self.name, "gate_pool_size", self.gate_pool_size, 1)

    def build(self, backbone_factory: Callable[[], nn.Module], task_names: Sequence[str]) -> Architecture:
        return GatedExperts(
            self.name,
            backbone_factory,
            task_names,
            shared_stages=self.shared_stages,
            num_levels=1,
            task_experts=0,
            shared_experts=self.num_experts,
            gate_factory=SoftmaxGate,
            gate_pool_size=self.gate_pool_size,
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
