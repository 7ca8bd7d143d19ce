"""MMoE: multi-gate mixture-of-experts (Ma et al., KDD 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mtlvision.models.architectures._gates import ExpertLayout, GatedExpertsSpec
from mtlvision.models.architectures.registry import ARCHITECTURES


@ARCHITECTURES.register(
    "mmoe",
    "multi-gate mixture-of-experts: backbone-copy experts mixed per task and stage by softmax gates",
    "Ma et al., Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts, KDD 2018",
)
@dataclass(frozen=True, repr=False)
class MMoE(GatedExpertsSpec):
    """Experts shared by all tasks, mixed by one softmax gate per task (and per stage).

    ``num_experts`` experts, each a copy of the backbone's stages after the first ``shared_stages``
    (0: full backbone copies, as LibMTL does; 1: experts on top of one shared stem stage, far cheaper).
    The paper tunes the number of experts per data set; 4 is our default for image backbones, where
    each expert is a whole backbone. Experts are shared parameters; gates are task-specific.
    """

    name: ClassVar[str] = "mmoe"
    minimums: ClassVar[dict[str, int]] = {"num_experts": 1}
    num_experts: int = 4

    def layout(self) -> ExpertLayout:
        return ExpertLayout(num_levels=1, task_experts=0, shared_experts=self.num_experts)
