"""A task-prompted cross-task attention decoder, in the spirit of InvPT (Ye and Xu, ECCV 2022).

InvPT's central idea is one transformer that attends jointly over the positions of every task, so that
each task's features are refined from every other task's at every location. This module keeps that idea
and nothing more: at one scale of the shared backbone (the coarsest by default), the map is projected to
``dim`` channels, given a depthwise-convolution position encoding, and copied once per task with a
learned task embedding (the task prompt) added; the ``T × H × W`` tokens go through ``depth`` pre-norm
transformer layers with global self-attention across tasks and positions; each task's tokens are then
projected back and added to that scale of the task's features. It is not InvPT: there is no inverted
pyramid of UP-transformer blocks, no task-specific preliminary decoder and no multi-scale message
passing. The output projection starts at zero, so the network starts as hard parameter sharing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures._stages import require_at_least
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone


class CrossTaskAttention(Architecture):
    """A shared backbone, then joint self-attention over every task's tokens at scale ``level``.

    :meth:`encode` returns the backbone features and every task's ``level`` map with its attended tokens
    added; :meth:`decode` gives each task its own refined ``level`` map and the other scales unchanged.
    """

    def __init__(self, backbone: Backbone, task_names: Sequence[str], spec: TaskAttention) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = list(task_names)
        self.feature_channels = list(backbone.feature_channels)
        self.feature_strides = list(backbone.feature_strides)
        levels = len(self.feature_channels)
        if not -levels <= spec.level < levels:
            raise ConfigError(
                f"architecture 'task_attention': level={spec.level} is out of range for a backbone with "
                f"{levels} feature maps (use 0 to {levels - 1}, or -1 for the coarsest)."
            )
        self.level = spec.level % levels
        channels, dim = self.feature_channels[self.level], spec.dim
        self.project_in = nn.Conv2d(channels, dim, 1)
        self.position = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.task_prompts = nn.Parameter(torch.randn(len(self.task_names), dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, spec.heads, dim * spec.mlp_ratio, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(spec.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.project_out = nn.Conv2d(dim, channels, 1)
        nn.init.zeros_(self.project_out.weight)
        nn.init.zeros_(cast(Tensor, self.project_out.bias))

    def encode(self, images: Tensor) -> list[Tensor]:
        """Every task's refined ``level`` map (tasks in order), then the backbone's features (fine to coarse).

        The attention mixes every task's tokens, so everything up to each task's refined map is shared:
        the representation is what the heads read, and every shared parameter lies before it.
        """
        backbone = self.backbone(images)
        shared = backbone[self.level]
        batch, _, rows, columns = shared.shape
        x = self.project_in(shared)
        x = x + self.position(x)
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, dim]
        prompted = tokens[:, None] + self.task_prompts[None, :, None]  # [B, T, HW, dim]
        joint = prompted.reshape(batch, -1, tokens.shape[-1])  # every task's tokens in one sequence
        for layer in self.layers:
            joint = layer(joint)
        per_task = self.norm(joint).reshape(batch, len(self.task_names), rows * columns, -1)
        refined = [
            shared + self.project_out(per_task[:, index].transpose(1, 2).reshape(batch, -1, rows, columns))
            for index in range(len(self.task_names))
        ]
        return [*refined, *backbone]

    def decode(self, representation: list[Tensor]) -> dict[str, list[Tensor]]:
        tasks = len(self.task_names)
        refined, backbone = representation[:tasks], representation[tasks:]
        return {
            name: [own if i == self.level else f for i, f in enumerate(backbone)]
            for name, own in zip(self.task_names, refined)
        }

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        return self.decode(self.encode(images))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p is not self.task_prompts)


@ARCHITECTURES.register(
    "task_attention",
    "shared backbone + joint cross-task self-attention over task-prompted tokens (in the spirit of InvPT)",
    "in the spirit of Ye and Xu, Inverted Pyramid Multi-task Transformer for Dense Scene Understanding, ECCV 2022",
)
@dataclass(frozen=True)
class TaskAttention(ArchitectureSpec):
    """Task-prompted cross-task attention at one backbone scale (see the module docstring).

    ``dim``: token width; ``depth``: transformer layers; ``heads``: attention heads (must divide ``dim``);
    ``mlp_ratio``: feed-forward width over ``dim``; ``level``: the backbone scale attended (-1: coarsest).
    """

    name: ClassVar[str] = "task_attention"
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    level: int = -1

    def __post_init__(self) -> None:
        for field in ("dim", "depth", "heads", "mlp_ratio"):
            require_at_least(self.name, field, getattr(self, field), 1)
        if self.dim % self.heads:
            raise ConfigError(f"architecture 'task_attention': heads={self.heads} must divide dim={self.dim}.")
        if isinstance(self.level, bool) or not isinstance(self.level, int):
            raise ConfigError(f"architecture 'task_attention': level={self.level!r} must be an integer.")

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        return CrossTaskAttention(backbone_factory(), task_names, self)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
