"""Cross-stitch networks (Misra et al., CVPR 2016)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures._stages import backbone_stages, feature_layout, stage_copies
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec, RepresentationUnavailable
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone


class CrossStitchNetwork(Architecture):
    """One backbone copy per task; after every stage, task t continues with sum_u alpha[t, u] * x_u.

    ``alpha`` at each stage is a [T, T, C] tensor (one T×T unit per channel) or [T, T, 1] (one unit per
    stage). Every copy feeds every task through the units, so all parameters are shared ones.
    """

    def __init__(
        self,
        backbone_factory: Callable[[], Backbone],
        task_names: Sequence[str],
        alpha: float,
        beta: float,
        per_channel: bool,
    ) -> None:
        super().__init__()
        backbone = backbone_factory()
        stages = backbone_stages(backbone, CrossStitch.name, 2, "cross-stitch units connect the copies between stages")
        self.task_names = list(task_names)
        self.feature_channels, self.feature_strides = feature_layout(backbone)
        num_tasks = len(self.task_names)
        self.columns = nn.ModuleList([stages, *stage_copies(backbone_factory, num_tasks - 1, 0, None)])
        unit = torch.full((num_tasks, num_tasks), beta)
        unit.fill_diagonal_(alpha)
        self.units = nn.ParameterList(
            nn.Parameter(unit[:, :, None].repeat(1, 1, channels if per_channel else 1).clone())
            for channels in self.feature_channels
        )

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        inputs = [images] * len(self.task_names)
        per_task: list[list[Tensor]] = [[] for _ in self.task_names]
        for stage, unit in enumerate(self.units):
            # every column is a ModuleList of stages (the backbone's, or a copy from stage_copies)
            outputs = torch.stack([cast(nn.ModuleList, column)[stage](x) for column, x in zip(self.columns, inputs)])
            stitched = torch.einsum("tuc,ubchw->tbchw", unit, outputs)
            inputs = list(stitched.unbind(0))
            for collected, feature in zip(per_task, inputs):
                collected.append(feature)
        return dict(zip(self.task_names, per_task))

    def encode(self, images: Tensor) -> list[Tensor]:
        raise RepresentationUnavailable(
            "architecture 'cross_stitch' has no single shared representation: every task has its own backbone "
            "copy. Use balancer.mode=params."
        )

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.parameters()


@ARCHITECTURES.register(
    "cross_stitch",
    "cross-stitch networks: one backbone per task, learned linear mixing after every stage",
    "Misra et al., Cross-stitch Networks for Multi-task Learning, CVPR 2016",
)
@dataclass(frozen=True)
class CrossStitch(ArchitectureSpec):
    """One network per task, linearly combined after every stage by learned cross-stitch units.

    Units start at ``alpha`` on the diagonal (a task keeps its own activations) and ``beta`` elsewhere;
    the paper's best initialisation for two tasks is (0.9, 0.1). With ``beta`` left unset it becomes
    ``(1 - alpha) / (T - 1)`` so that each row stays a convex combination for any number of tasks
    (0.1 for two tasks, the paper's value). ``alpha=1, beta=0`` gives independent networks. The paper
    also trains the units with a larger learning rate, a trainer setting outside the architecture.
    """

    name: ClassVar[str] = "cross_stitch"
    alpha: float = 0.9
    beta: float | None = None
    per_channel: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"architecture 'cross_stitch': alpha={self.alpha!r} must lie in [0, 1].")

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        beta = self.beta
        if beta is None:
            beta = (1.0 - self.alpha) / (len(task_names) - 1) if len(task_names) > 1 else 0.0
        return CrossStitchNetwork(backbone_factory, task_names, self.alpha, beta, self.per_channel)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
