"""MTI-Net: multi-scale task interaction networks (Vandenhende, Georgoulis and Van Gool, ECCV 2020).

Per backbone scale, coarse to fine: every pixel-map task refines the backbone features (with the features
the feature propagation module carried up from the coarser scale) into its own features and an
intermediate prediction; the feature propagation module (FPM) mixes the tasks' features into the next
finer scale; multi-modal distillation (PAD-Net's spatial attention between tasks) turns each scale's
initial task features into the features the task's head aggregates over all scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures._stages import require_at_least
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec, intermediate_key
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone
from mtlvision.tasks.base import TargetKind, Task

#: the target kinds that are per-pixel maps: the tasks that take part in MTI-Net
PIXEL_MAPS = (TargetKind.MASK, TargetKind.DEPTH, TargetKind.NORMALS, TargetKind.EDGES)
#: squeeze-and-excitation reduction ratio of the FPM's per-task SE blocks (the paper's r = 16)
SE_REDUCTION = 16


def batch_norm_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 conv + BN, a shortcut (1×1 conv + BN where the channels change), ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            batch_norm_conv(in_channels, out_channels, 3),
            nn.ReLU(inplace=True),
            batch_norm_conv(out_channels, out_channels, 3),
        )
        self.shortcut = batch_norm_conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class SqueezeExcitation(nn.Module):
    """Channel gates ``sigmoid(W2 relu(W1 mean_hw(x)))`` times ``x`` (Hu et al., CVPR 2018)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(1, channels // SE_REDUCTION)
        self.gate = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x.mean(dim=(2, 3)))[:, :, None, None]


class InitialPrediction(nn.Module):
    """One scale's per-task features (two basic blocks each) and intermediate predictions (a 1×1 convolution)."""

    def __init__(self, in_channels: int, channels: int, outputs: Sequence[int]) -> None:
        super().__init__()
        self.refinements = nn.ModuleList(
            nn.Sequential(BasicBlock(in_channels, channels), BasicBlock(channels, channels)) for _ in outputs
        )
        self.decoders = nn.ModuleList(nn.Conv2d(channels, out, 1) for out in outputs)

    def refine(self, shared: Tensor, propagated: Sequence[Tensor] | None) -> list[Tensor]:
        """Per task, its features from the backbone's ``shared`` and its ``propagated`` coarser FPM features."""
        if propagated is None:
            return [refine(shared) for refine in self.refinements]
        size = shared.shape[-2:]
        return [
            refine(torch.cat([shared, F.interpolate(p, size=size, mode="bilinear", align_corners=False)], 1))
            for refine, p in zip(self.refinements, propagated)
        ]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Per task, its intermediate prediction from its features."""
        return [decode(f) for decode, f in zip(self.decoders, features)]


class FeaturePropagation(nn.Module):
    """The FPM: task features concatenated, a per-channel softmax over tasks from a non-linear function of
    them weights each task's share, a basic block reduces the mix to one task's width, and each task adds
    its own squeeze-and-excitation of it to its features."""

    def __init__(self, num_tasks: int, channels: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        total = num_tasks * channels
        reduced = total // 4
        self.non_linear = nn.Sequential(
            BasicBlock(total, reduced), BasicBlock(reduced, reduced), nn.Conv2d(reduced, total, 1)
        )
        self.reduction = BasicBlock(total, channels)
        self.excitations = nn.ModuleList(SqueezeExcitation(channels) for _ in range(num_tasks))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        concat = torch.cat(list(features), 1)
        b, c, h, w = concat.shape
        shape = (b, self.num_tasks, c // self.num_tasks, h, w)
        mask = self.non_linear(concat).view(shape).softmax(dim=1)  # for each channel, a distribution over tasks
        shared = self.reduction((mask * concat.view(shape)).view(b, c, h, w))
        return [own + excite(shared) for own, excite in zip(features, self.excitations)]


class SpatialAttention(nn.Module):
    """PAD-Net's message from another task: ``conv(x) ⊙ sigmoid(conv'(x))`` (3×3 convolutions, no bias)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.message = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.attention = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.message(x) * self.attention(x)


class Distillation(nn.Module):
    """Multi-modal distillation at one scale: task t gets ``F_t + Σ_{a≠t} SA_{t,a}(F_a)``."""

    def __init__(self, num_tasks: int, channels: int) -> None:
        super().__init__()
        self.attention = nn.ModuleList(
            nn.ModuleList(SpatialAttention(channels) for _ in range(num_tasks - 1)) for _ in range(num_tasks)
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for task, own in enumerate(features):
            others = [f for other, f in enumerate(features) if other != task]
            blocks = cast(nn.ModuleList, self.attention[task])  # one ModuleList per task, built in __init__
            out.append(own + torch.stack([block(f) for block, f in zip(blocks, others)]).sum(0))
        return out


class MultiScaleTaskInteraction(Architecture):
    """A shared backbone, then MTI-Net over its ``scales`` coarsest features for the pixel-map tasks.

    ``forward``/``decode`` return, per task, its distilled features at every used scale (fine to coarse),
    and under :func:`intermediate_key` its intermediate predictions at every scale (fine to coarse).
    Tasks that are not pixel maps (``passed``) receive the backbone's features at those scales, through a
    1×1 convolution where the task channels differ from the backbone's.

    The shared part (backbone, task feature refinements, FPMs) ends in every task's initial features at
    every scale: :meth:`encode` returns them (scale by scale, fine to coarse, tasks in order), followed by
    the backbone's used features when some task is passed them.
    """

    def __init__(
        self,
        backbone: Backbone,
        task_names: Sequence[str],
        interacting: Sequence[Task],
        scales: int,
        channels: Sequence[int] | None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = list(task_names)
        self.interacting = [task.name for task in interacting]
        self.intermediate_tasks = tuple(self.interacting)
        backbone_channels = list(backbone.feature_channels)[-scales:]
        widths = list(channels) if channels is not None else backbone_channels
        self.first = len(backbone.feature_channels) - scales
        self.feature_channels = widths
        self.feature_strides = list(backbone.feature_strides)[-scales:]
        outputs = [task.output_channels for task in interacting]
        num = len(interacting)
        # fine to coarse; the coarsest scale refines the backbone's features alone, every finer one
        # concatenates the FPM's task features propagated from the next coarser scale
        self.initial = nn.ModuleList(
            InitialPrediction(backbone_channels[s] + (widths[s + 1] if s + 1 < scales else 0), widths[s], outputs)
            for s in range(scales)
        )
        self.propagation = nn.ModuleList(FeaturePropagation(num, widths[s]) for s in range(1, scales))
        self.distillation = nn.ModuleList(Distillation(num, widths[s]) for s in range(scales))
        passed = [name for name in self.task_names if name not in self.interacting]
        self.passed = nn.ModuleDict(
            {
                name: nn.ModuleList(
                    nn.Conv2d(c, w, 1) if c != w else nn.Identity() for c, w in zip(backbone_channels, widths)
                )
                for name in passed
            }
        )

    def encode(self, images: Tensor) -> list[Tensor]:
        used = list(self.backbone(images))[self.first :]
        per_scale: list[list[Tensor]] = [[] for _ in used]
        propagated: list[Tensor] | None = None
        for scale in reversed(range(len(used))):
            per_scale[scale] = cast(InitialPrediction, self.initial[scale]).refine(used[scale], propagated)
            if scale > 0:
                propagated = self.propagation[scale - 1](per_scale[scale])
        return [f for features in per_scale for f in features] + (used if len(self.passed) else [])

    def decode(self, representation: list[Tensor]) -> dict[str, list[Tensor]]:
        num, scales = len(self.interacting), len(self.initial)
        per_scale = [representation[s * num : (s + 1) * num] for s in range(scales)]
        intermediate = [initial(features) for initial, features in zip(self.initial, per_scale)]
        distilled = [distil(features) for distil, features in zip(self.distillation, per_scale)]
        out: dict[str, list[Tensor]] = {}
        for index, name in enumerate(self.interacting):
            out[name] = [scale[index] for scale in distilled]
            out[intermediate_key(name)] = [scale[index] for scale in intermediate]
        used = representation[num * scales :]
        for name, projections in self.passed.items():
            # one ModuleList of per-scale projections per passed task, built in __init__
            out[name] = [project(x) for project, x in zip(cast(nn.ModuleList, projections), used)]
        return out

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        return self.decode(self.encode(images))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone, every task's feature refinement (it feeds the FPM and the other tasks' distillation)
        and the FPMs: everything :meth:`encode` computes."""
        yield from self.backbone.parameters()
        for module in self.initial:
            yield from cast(InitialPrediction, module).refinements.parameters()
        yield from self.propagation.parameters()


@ARCHITECTURES.register(
    "mti_net",
    "MTI-Net: per-scale task features and intermediate predictions, feature propagation coarse to fine, "
    "multi-modal distillation at every scale",
    "Vandenhende, Georgoulis and Van Gool, MTI-Net: Multi-Scale Task Interaction Networks for Multi-Task "
    "Learning, ECCV 2020",
)
@dataclass(frozen=True)
class MTINet(ArchitectureSpec):
    """MTI-Net over the backbone's ``scales`` coarsest feature maps (4 in the paper).

    ``channels`` are the task features' channels at each used scale, fine to coarse (the backbone's at
    those scales when unset, as in the MTL survey's HRNet code). Every pixel-map task (segmentation, depth,
    normals, edges; at least two) takes part; other tasks (classification, multi-label, detection) get
    the backbone's features at those scales. The intermediate predictions' losses join each task's loss.
    """

    name: ClassVar[str] = "mti_net"
    scales: int = 4
    channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        require_at_least(self.name, "scales", self.scales, 1)
        if self.channels is not None:
            if not isinstance(self.channels, (list, tuple)) or len(self.channels) != self.scales:
                raise ConfigError(
                    f"architecture 'mti_net': channels={self.channels!r} must list one channel count per used "
                    f"scale, fine to coarse ({self.scales} with scales={self.scales})."
                )
            for value in self.channels:
                require_at_least(self.name, "channels", value, 1)
            object.__setattr__(self, "channels", tuple(self.channels))

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        raise ConfigError(
            "architecture 'mti_net' makes intermediate predictions, so it needs each task's output channels, "
            "not only its name: build it with build_for(backbone_factory, tasks) (MultiTaskModel does)."
        )

    def build_for(self, backbone_factory: Callable[[], Backbone], tasks: Sequence[Task]) -> Architecture:
        interacting = [task for task in tasks if task.target_kind in PIXEL_MAPS]
        if len(interacting) < 2:
            raise ConfigError(
                "architecture 'mti_net' makes tasks interact through their per-pixel predictions and needs at "
                f"least two pixel-map tasks (segmentation, depth, normals, edges); the pixel-map tasks here are "
                f"{[t.name for t in interacting]}. Pick another architecture (hps, padnet, mtan)."
            )
        backbone = backbone_factory()
        available = len(backbone.feature_channels)
        if self.scales > available:
            raise ConfigError(
                f"architecture 'mti_net': scales={self.scales}, but backbone {getattr(backbone, 'name', '')!r} "
                f"gives {available} feature maps. Set model.architecture.scales to at most {available}."
            )
        widths = self.channels or tuple(backbone.feature_channels[-self.scales :])
        if len(interacting) * min(widths) < 4:
            raise ConfigError(
                f"architecture 'mti_net': the FPM reduces the {len(interacting)} tasks' concatenated features "
                f"by 4, so tasks × channels must be at least 4 at every scale; channels are {list(widths)}."
            )
        return MultiScaleTaskInteraction(backbone, [t.name for t in tasks], interacting, self.scales, self.channels)

    def describe(self) -> dict[str, Any]:
        described = asdict(self)
        if self.channels is not None:
            described["channels"] = list(self.channels)
        return {"name": self.name, **described}
