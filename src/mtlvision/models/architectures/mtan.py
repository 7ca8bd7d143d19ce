"""MTAN: multi-task attention network (Liu, Johns and Davison, CVPR 2019)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.models.architectures._stages import backbone_stages, feature_layout, require_at_least, run_stages
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone


def conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class AttentionModule(nn.Module):
    """One task's attention at one stage: mask = g([shared; f(previous attended)]), attended = mask ⊙ shared.

    ``g`` is two 1×1 conv-BN layers (ReLU, then sigmoid, so the mask lies in [0, 1]) with a bottleneck of
    ``channels // reduction``; ``f`` is a 3×3 conv-BN-ReLU from the previous stage's channels, pooled to the
    shared feature's resolution. The first stage has no previous attended feature.
    """

    def __init__(self, channels: int, previous_channels: int | None, reduction: int) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.carry = (
            None
            if previous_channels is None
            else nn.Sequential(conv_bn(previous_channels, channels, 3), nn.ReLU(inplace=True))
        )
        in_channels = channels if previous_channels is None else 2 * channels
        self.mask = nn.Sequential(
            conv_bn(in_channels, hidden, 1), nn.ReLU(inplace=True), conv_bn(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, shared: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor]:
        """(attended feature, mask) for the shared feature of this stage."""
        mask_input = shared
        if self.carry is not None and previous is not None:
            carried = self.carry(previous)
            if carried.shape[-2:] != shared.shape[-2:]:
                carried = F.adaptive_max_pool2d(carried, shared.shape[-2:])
            mask_input = torch.cat([shared, carried], dim=1)
        mask = self.mask(mask_input)
        return mask * shared, mask


class MultiTaskAttentionNetwork(Architecture):
    """A shared backbone whose stage outputs every task re-weights with its own soft attention masks.

    The paper computes the mask from a stage's intermediate feature and applies it to the stage's output;
    a backbone-agnostic stage has no uniform intermediate point, so both are the stage output here.
    The shared backbone features are the one shared representation (:meth:`encode`); the attention
    modules turn them into per-task features (:meth:`decode`).
    """

    def __init__(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str], reduction: int) -> None:
        super().__init__()
        backbone = backbone_factory()
        self.stages = backbone_stages(backbone, MTAN.name, 2, "attention is chained from stage to stage")
        self.task_names = list(task_names)
        self.feature_channels, self.feature_strides = feature_layout(backbone)
        previous = [None, *self.feature_channels[:-1]]
        self.attention = nn.ModuleList(
            nn.ModuleList(
                AttentionModule(channels, before, reduction)
                for channels, before in zip(self.feature_channels, previous)
            )
            for _ in self.task_names
        )

    def encode(self, images: Tensor) -> list[Tensor]:
        return run_stages(self.stages, images)

    def attend(self, representation: Sequence[Tensor]) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]:
        """Per-task attended features and the masks that made them, from the shared features."""
        features: dict[str, list[Tensor]] = {}
        masks: dict[str, list[Tensor]] = {}
        for name, modules in zip(self.task_names, self.attention):
            assert isinstance(modules, nn.ModuleList)  # one ModuleList of attention modules per task
            attended: Tensor | None = None
            features[name], masks[name] = [], []
            for module, shared in zip(modules, representation):
                attended, mask = module(shared, attended)
                features[name].append(attended)
                masks[name].append(mask)
        return features, masks

    def decode(self, representation: list[Tensor]) -> dict[str, list[Tensor]]:
        return self.attend(representation)[0]

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        return self.decode(self.encode(images))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.stages.parameters()


@ARCHITECTURES.register(
    "mtan",
    "multi-task attention network: shared backbone, per-task soft attention masks at every stage",
    "Liu, Johns and Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019",
)
@dataclass(frozen=True)
class MTAN(ArchitectureSpec):
    """Shared backbone plus per-task soft attention masks at every stage, chained across stages.

    ``reduction`` sets the attention bottleneck (``channels // reduction``; 4 as in the authors' ResNet
    version, where the mask layers narrow to a bottleneck's width).
    """

    name: ClassVar[str] = "mtan"
    reduction: int = 4

    def __post_init__(self) -> None:
        require_at_least(self.name, "reduction", self.reduction, 1)

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        return MultiTaskAttentionNetwork(backbone_factory, task_names, self.reduction)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
