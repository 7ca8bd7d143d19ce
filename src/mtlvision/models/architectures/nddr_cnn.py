"""NDDR-CNN: neural discriminative dimensionality reduction between task networks (Gao et al., CVPR 2019)."""

from __future__ import annotations

import math
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

#: batch-norm momentum of the NDDR layers, as in the NDDR-CNN authors' code (kept by the MTL survey's)
NDDR_MOMENTUM = 0.05


class NDDRLayer(nn.Module):
    """Per task, a 1×1 convolution of the concatenated features of every task, batch norm and ReLU.

    Task t's convolution starts as ``alpha`` times the identity on task t's channels and ``beta`` times the
    identity on every other task's (the paper's diagonal initialisation); batch norm starts at weight 1,
    bias 0.
    """

    def __init__(self, num_tasks: int, channels: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.reductions = nn.ModuleList()
        identity = torch.eye(channels)
        for task in range(num_tasks):
            conv = nn.Conv2d(num_tasks * channels, channels, 1, bias=False)
            weight = torch.cat([identity * (alpha if other == task else beta) for other in range(num_tasks)], dim=1)
            with torch.no_grad():
                conv.weight.copy_(weight[:, :, None, None])
            self.reductions.append(
                nn.Sequential(conv, nn.BatchNorm2d(channels, momentum=NDDR_MOMENTUM), nn.ReLU(inplace=True))
            )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        stacked = torch.cat(list(features), dim=1)
        return [reduction(stacked) for reduction in self.reductions]


class NDDRNetwork(Architecture):
    """One backbone copy per task; after every stage an :class:`NDDRLayer` fuses the copies' features.

    Every copy feeds every task through the layers, so all parameters are shared ones.
    """

    def __init__(
        self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str], alpha: float, beta: float
    ) -> None:
        super().__init__()
        backbone = backbone_factory()
        stages = backbone_stages(backbone, NDDRCNN.name, 1, "NDDR layers fuse the copies after each stage")
        self.task_names = list(task_names)
        self.feature_channels, self.feature_strides = feature_layout(backbone)
        num_tasks = len(self.task_names)
        self.columns = nn.ModuleList([stages, *stage_copies(backbone_factory, num_tasks - 1, 0, None)])
        self.fusions = nn.ModuleList(NDDRLayer(num_tasks, c, alpha, beta) for c in self.feature_channels)

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        inputs = [images] * len(self.task_names)
        per_task: list[list[Tensor]] = [[] for _ in self.task_names]
        for stage, fusion in enumerate(self.fusions):
            # every column is a ModuleList of stages (the backbone's, or a copy from stage_copies)
            inputs = fusion([cast(nn.ModuleList, column)[stage](x) for column, x in zip(self.columns, inputs)])
            for collected, feature in zip(per_task, inputs):
                collected.append(feature)
        return dict(zip(self.task_names, per_task))

    def encode(self, images: Tensor) -> list[Tensor]:
        raise RepresentationUnavailable(
            "architecture 'nddr_cnn' has no single shared representation: every task has its own backbone "
            "copy. Use balancer.mode=params."
        )

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.parameters()


@ARCHITECTURES.register(
    "nddr_cnn",
    "NDDR-CNN: one backbone per task, fused after every stage by per-task 1x1 conv + BN + ReLU",
    "Gao et al., NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by Neural Discriminative "
    "Dimensionality Reduction, CVPR 2019",
)
@dataclass(frozen=True)
class NDDRCNN(ArchitectureSpec):
    """One network per task; after every stage, task t continues with ReLU(BN(W_t [x_1; ...; x_T])).

    ``W_t`` starts as ``alpha`` on task t's own channels and ``beta`` on every other task's (0.9 and 0.1,
    the paper's and the MTL survey's values); ``alpha=1, beta=0`` starts as separate networks (up to the
    layers' batch norm and ReLU). With C channels at a stage, its layer holds ``T (T C² + 2 C)``
    parameters.
    """

    name: ClassVar[str] = "nddr_cnn"
    alpha: float = 0.9
    beta: float = 0.1

    def __post_init__(self) -> None:
        for field in ("alpha", "beta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"architecture 'nddr_cnn': {field}={value!r} must be a finite number.")

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        return NDDRNetwork(backbone_factory, task_names, float(self.alpha), float(self.beta))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
