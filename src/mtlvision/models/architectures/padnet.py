"""PAD-Net-style multi-modal distillation (Xu, Ouyang, Wang and Sebe, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, cast

from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures._stages import backbone_stages, feature_layout, require_at_least, run_stages
from mtlvision.models.architectures.base import Architecture, ArchitectureSpec
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DistillationScale(nn.Module):
    """Intermediate task features and attention-guided message passing at one backbone scale.

    For task k: ``F_k = branch_k(shared)``; ``out_k = F_k + sum_{l != k} sigmoid(W_g^k * F_k) ⊙ (W_{k,l} * F_l)``
    (the paper's attention-guided distillation, module C); ``shared + project_k(out_k)`` goes to the heads,
    so channels stay the backbone's.
    """

    def __init__(self, channels: int, width: int, num_tasks: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv_bn_relu(channels, width) for _ in range(num_tasks))
        self.attention = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.Sigmoid()) for _ in range(num_tasks)
        )
        self.messages = nn.ModuleList(
            nn.ModuleList(conv_bn_relu(width, width) for _ in range(num_tasks - 1)) for _ in range(num_tasks)
        )
        self.projections = nn.ModuleList(nn.Conv2d(width, channels, 1) for _ in range(num_tasks))

    def intermediate(self, shared: Tensor) -> list[Tensor]:
        """Every task's intermediate features ``F_k = branch_k(shared)``."""
        return [branch(shared) for branch in self.branches]

    def forward(self, shared: Tensor, intermediate: Sequence[Tensor]) -> list[Tensor]:
        """Every task's distilled features from the scale's ``shared`` map and the tasks' ``intermediate`` ones."""
        outputs = []
        for task, own in enumerate(intermediate):
            others = [*intermediate[:task], *intermediate[task + 1 :]]
            gate = self.attention[task](own)
            distilled = own
            messages = self.messages[task]
            assert isinstance(messages, nn.ModuleList)  # one ModuleList of message convs per task, built in __init__
            for message, other in zip(messages, others):
                distilled = distilled + gate * message(other)
            outputs.append(shared + self.projections[task](distilled))
        return outputs


class MultiModalDistillation(Architecture):
    """A shared backbone, then PAD-Net distillation between the dense tasks at every backbone scale.

    Distillation runs at every scale so that dense heads (FPN, ASPP, detection) keep a multi-scale input.
    Tasks outside the distillation (image-level tasks) receive the shared backbone features unchanged.
    The paper supervises the intermediate predictions with the task losses (deep supervision). An
    architecture knows task names, not their outputs, so here the intermediate branches are trained
    end to end through the distillation only.
    """

    def __init__(
        self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str], distilled: Sequence[str], width: int
    ) -> None:
        super().__init__()
        backbone = backbone_factory()
        self.stages = backbone_stages(backbone, PADNet.name, 1, "the distillation needs backbone features")
        self.task_names = list(task_names)
        self.distilled = list(distilled)
        self.feature_channels, self.feature_strides = feature_layout(backbone)
        self.scales = nn.ModuleList(
            DistillationScale(channels, width, len(self.distilled)) for channels in self.feature_channels
        )

    def encode(self, images: Tensor) -> list[Tensor]:
        """Every scale's intermediate task features (scale by scale, fine to coarse, distilled tasks in order),
        then the backbone's features (fine to coarse, so the last is the coarsest, as under HPS): the shared
        part ends where the tasks' distillations begin, so every shared parameter lies before it."""
        shared = run_stages(self.stages, images)
        intermediate = [
            f for scale, x in zip(self.scales, shared) for f in cast(DistillationScale, scale).intermediate(x)
        ]
        return [*intermediate, *shared]

    def decode(self, representation: list[Tensor]) -> dict[str, list[Tensor]]:
        scales, num = len(self.scales), len(self.distilled)
        shared = representation[scales * num :]
        intermediate = [representation[s * num : (s + 1) * num] for s in range(scales)]
        features = {name: list(shared) for name in self.task_names}
        per_scale = [scale(x, own) for scale, x, own in zip(self.scales, shared, intermediate)]
        for index, name in enumerate(self.distilled):
            features[name] = [outputs[index] for outputs in per_scale]
        return features

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        return self.decode(self.encode(images))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone, and every task's intermediate branch (it feeds every other task's distillation):
        everything :meth:`encode` computes."""
        yield from self.stages.parameters()
        for scale in self.scales:
            yield from cast(DistillationScale, scale).branches.parameters()


@ARCHITECTURES.register(
    "padnet",
    "PAD-Net-style multi-modal distillation between dense tasks at every backbone scale",
    "Xu et al., PAD-Net: Multi-Tasks Guided Prediction-and-Distillation Network, CVPR 2018",
)
@dataclass(frozen=True)
class PADNet(ArchitectureSpec):
    """Per-task intermediate features from the shared backbone, mixed across tasks by attention-guided distillation.

    ``dense_tasks`` names the tasks that take part (all tasks when left unset; at least two); the others
    get the shared features unchanged. ``width`` is the channel count of the intermediate features.
    """

    name: ClassVar[str] = "padnet"
    dense_tasks: tuple[str, ...] | None = None
    width: int = 64

    def __post_init__(self) -> None:
        require_at_least(self.name, "width", self.width, 1)

    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture:
        distilled = list(task_names) if self.dense_tasks is None else list(self.dense_tasks)
        unknown = [name for name in distilled if name not in task_names]
        if unknown:
            raise ConfigError(
                f"architecture 'padnet': dense_tasks names {unknown}, which are not among the model's tasks "
                f"{list(task_names)}."
            )
        if len(distilled) < 2:
            raise ConfigError(
                f"architecture 'padnet' distils between dense tasks and needs at least two; got {distilled}. "
                "Set model.architecture.dense_tasks to two or more dense tasks, or pick another architecture."
            )
        return MultiModalDistillation(backbone_factory, task_names, distilled, self.width)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}
