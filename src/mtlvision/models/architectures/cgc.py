"""CGC: customized gate control (Tang et al., RecSys 2020), the single-level form of PLE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mtlvision.models.architectures._gates import ExpertLayout, GatedExpertsSpec
from mtlvision.models.architectures.registry import ARCHITECTURES


@ARCHITECTURES.register(
    "cgc",
    "customized gate control: task-specific and shared experts, one gate per task",
    "Tang et al., Progressive Layered Extraction (PLE), RecSys 2020",
)
@dataclass(frozen=True, repr=False)
class CGC(GatedExpertsSpec):
    """Task-specific and shared experts; each task's softmax gate mixes its own experts and the shared ones.

    Experts are copies of the backbone's stages after the first ``shared_stages`` (0: full copies, as in
    LibMTL). Shared experts are shared parameters; a task's experts and gates serve that task alone.
    """

    name: ClassVar[str] = "cgc"
    minimums: ClassVar[dict[str, int]] = {"task_experts": 1, "shared_experts": 1}
    task_experts: int = 1
    shared_experts: int = 1

    def layout(self) -> ExpertLayout:
        return ExpertLayout(num_levels=1, task_experts=self.task_experts, shared_experts=self.shared_experts)
