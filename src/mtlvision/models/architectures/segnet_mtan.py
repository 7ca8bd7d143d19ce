"""SegNet-MTAN: the multi-task attention network on SegNet, the NYUv2 / Cityscapes benchmark network.

Liu, Johns and Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019 (Sec. 3 and Fig. 2); the
network every later balancing paper (Nash-MTL, FAMO, FairGrad, DB-MTL, ...) reports Δm with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone
from mtlvision.models.segnet import SEGNET_WIDTHS, SegNet, SegNetLevels, conv_bn_relu


def attention_layer(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """A soft mask: 1×1 conv-BN-ReLU, 1×1 conv-BN, sigmoid (values in [0, 1])."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, kernel_size=1),
        nn.BatchNorm2d(out_channels),
        nn.Sigmoid(),
    )


class SegNetAttentionNetwork(Architecture):
    """SegNet shared by every task, plus per-task attention masks at each of its ten levels.

    Encoder level ``j`` of task ``t``: the mask ``encoder_att[t][j]`` is computed from the level's first
    block output (concatenated, from level 1 on, with the task's attended feature of the level before) and
    multiplies the level's full output; the shared ``encoder_block_att[j]`` (conv-BN-ReLU) and a 2×2 max
    pool carry the attended feature to the next level. The decoder mirrors it with bilinear upsampling
    (``align_corners=True``), the shared ``decoder_block_att``, masks ``decoder_att[t]`` from the unpooled
    map and the carried feature, applied to the decoder step's output. Each task receives its attended
    64-channel map at input resolution.

    ``shared_parameters`` are SegNet's and the shared ``*_block_att`` layers; with ``balance_attention``
    they also include the per-task masks, i.e. every parameter but the heads, as in the code of Nash-MTL and
    FAMO (a gradient method then sees the masks' gradients in its Gramian, and each task's mask is updated
    with that task's weight).
    """

    def __init__(self, backbone: SegNet, task_names: Sequence[str], balance_attention: bool) -> None:
        super().__init__()
        w = SEGNET_WIDTHS
        self.backbone = backbone
        self.task_names = list(task_names)
        self.balance_attention = balance_attention
        self.feature_channels, self.feature_strides = [w[0]], [1]
        self.encoder_att = nn.ModuleList(
            nn.ModuleList(attention_layer(w[j] if j == 0 else 2 * w[j], w[j], w[j]) for j in range(5))
            for _ in self.task_names
        )
        # decoder_att[t][j] is used at the decoder step of level j (run from 4 down to 0), like SegNet's
        self.decoder_att = nn.ModuleList(
            nn.ModuleList(
                attention_layer(2 * w[0] if j == 0 else w[j] + w[j - 1], w[max(j - 1, 0)], w[max(j - 1, 0)])
                for j in range(5)
            )
            for _ in self.task_names
        )
        self.encoder_block_att = nn.ModuleList(conv_bn_relu(w[j], w[min(j + 1, 4)]) for j in range(5))
        self.decoder_block_att = nn.ModuleList(conv_bn_relu(w[j], w[max(j - 1, 0) if j < 4 else 4]) for j in range(5))

    def attend(self, levels: SegNetLevels, encoder_att: nn.ModuleList, decoder_att: nn.ModuleList) -> Tensor:
        """One task's attended output from the shared SegNet maps."""
        carried: Tensor | None = None
        for j in range(5):
            source = levels.encoder_first[j]
            mask = encoder_att[j](source if carried is None else torch.cat([source, carried], dim=1))
            carried = F.max_pool2d(self.encoder_block_att[j](mask * levels.encoder_out[j]), kernel_size=2, stride=2)
        assert carried is not None  # five levels ran
        for step, level in enumerate(reversed(range(5))):
            upsampled = F.interpolate(carried, scale_factor=2, mode="bilinear", align_corners=True)
            carried_in = self.decoder_block_att[level](upsampled)
            mask = decoder_att[level](torch.cat([levels.unpooled[step], carried_in], dim=1))
            carried = mask * levels.decoder_out[step]
        return carried

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        levels = self.backbone.levels(images)
        features = {}
        for name, encoder_att, decoder_att in zip(self.task_names, self.encoder_att, self.decoder_att):
            assert isinstance(encoder_att, nn.ModuleList) and isinstance(decoder_att, nn.ModuleList)  # per task
            features[name] = [self.attend(levels, encoder_att, decoder_att)]
        return features

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters()
        yield from self.encoder_block_att.parameters()
        yield from self.decoder_block_att.parameters()
        if self.balance_attention:
            yield from self.encoder_att.parameters()
            yield from self.decoder_att.parameters()


@ARCHITECTURES.register(
    "segnet_mtan",
    "MTAN on SegNet (backbone segnet): per-task attention masks at every encoder and decoder level",
    "Liu, Johns and Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019",
)
@dataclass(frozen=True)
class SegNetMTAN(ArchitectureSpec):
    """The SegNet-MTAN benchmark network; needs ``model.backbone: segnet``.

    ``balance_attention``: count the per-task attention masks among the parameters gradient balancers act
    on (Nash-MTL's and FAMO's code do, the ``nyuv2_segnet_mtan`` preset does); off, only parameters that
    several tasks use are balanced.
    """

    name: ClassVar[str] = "segnet_mtan"
    backbone: ClassVar[str | None] = "segnet"
    balance_attention: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.balance_attention, bool):
            raise ConfigError(
                f"architecture 'segnet_mtan': balance_attention must be true or false, got {self.balance_attention!r}."
            )

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        backbone = backbone_factory()
        if not isinstance(backbone, SegNet):
            raise ConfigError(
                f"architecture 'segnet_mtan' attends to SegNet's encoder and decoder levels and needs "
                f"model.backbone=segnet; got backbone {getattr(backbone, 'name', type(backbone).__name__)!r}. "
                "For other backbones use architecture 'mtan'."
            )
        return SegNetAttentionNetwork(backbone, task_names, self.balance_attention)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
