"""Hard parameter sharing: one backbone for every task, one head per task."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from mtlvision.models.architectures.base import Architecture, ArchitectureSpec
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone


class HardSharing(Architecture):
    """Every task receives the same multi-scale features of one shared backbone."""

    def __init__(self, backbone: Backbone, task_names: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = list(task_names)
        self.feature_channels = list(backbone.feature_channels)
        self.feature_strides = list(backbone.feature_strides)

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        return self.decode(self.encode(images))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def encode(self, images: Tensor) -> list[Tensor]:
        return self.backbone(images)

    def decode(self, representation: list[Tensor]) -> dict[str, list[Tensor]]:
        return {name: representation for name in self.task_names}


@ARCHITECTURES.register(
    "hps",
    "hard parameter sharing: one shared backbone, one head per task",
    "Caruana, Multitask Learning, Machine Learning 28, 1997",
)
@dataclass
class HPS(ArchitectureSpec):
    """Hard parameter sharing (no hyper-parameters)."""

    name = "hps"

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> HardSharing:
        return HardSharing(backbone_factory(), task_names)
