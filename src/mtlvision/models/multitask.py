"""The multi-task model: backbone -> sharing architecture -> one head per task; dict out."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlvision.errors import ConfigError, UnknownNameError
from mtlvision.models.architectures import HPS, ArchitectureSpec
from mtlvision.models.architectures.base import DEEP_SUPERVISION, intermediate_key
from mtlvision.models.backbones import Backbone, BackboneStage, create_backbone
from mtlvision.models.heads import build_head
from mtlvision.models.init import INIT_SCHEMES, PRETRAINED, initialise
from mtlvision.tasks.base import Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CutRepresentation:
    """The shared representation cut out of the autograd graph: ``trunk`` as the architecture's ``encode``
    returned it, ``inputs`` what the heads consume instead (detached copies that require grad).

    A trunk's tensors are often computed from one another (a backbone's stage outputs feed the next
    stage), so ``∂L_t/∂trunk[i]`` would count the path through a later stage twice once it is
    back-propagated from every stage. The gradient of a loss with respect to ``inputs`` holds only the
    heads' direct use of each tensor; back-propagating those gradients from ``trunk`` then gives exactly
    the gradient of the shared parameters.
    """

    trunk: list[Tensor]
    inputs: list[Tensor]

    @classmethod
    def of(cls, trunk: Sequence[Tensor]) -> CutRepresentation:
        # every copy requires grad (when grad is on), also those of frozen stages: a head's gradient is
        # defined for each of them, and only trunk tensors that require grad carry it further
        return cls(list(trunk), [t.detach().requires_grad_(torch.is_grad_enabled()) for t in trunk])


class MultiTaskModel(nn.Module):
    """``model(images) -> {task_name: prediction}`` for images in [0, 1], shape ``[B, C, H, W]``.

    In training mode, an architecture with deep supervision (MTI-Net) adds ``{"deep_supervision": {task:
    [intermediate predictions at image size]}}``; the trainer adds their losses to the task's.

    Args:
        backbone: a backbone name (see :func:`create_backbone`) or a factory returning a :class:`Backbone`.
        tasks: the tasks, each with a unique name.
        architecture: how tasks share the backbone (hard parameter sharing by default).
        heads: per task name, a head name or ``{"name": ..., **params}``; tasks not listed use their
            ``default_head`` (a task's own head, e.g. detection's, takes precedence).
        init: initialisation scheme of the heads and, without pretrained weights, of the backbone
            (``kaiming``, ``xavier``, ``orthogonal``), or ``pretrained`` (needs ``pretrained``).
        pretrained: local timm/torchvision weights file loaded into every backbone the architecture builds.
        freeze_stages: number of leading backbone stages to freeze.
        mean: per-channel mean of the normalisation applied inside the model.
        std: per-channel standard deviation of that normalisation.
    """

    mean: Tensor  # buffers, [1, C, 1, 1]
    std: Tensor

    def __init__(
        self,
        backbone: str | Callable[[], Backbone],
        tasks: Sequence[Task],
        architecture: ArchitectureSpec | None = None,
        heads: Mapping[str, str | dict[str, Any]] | None = None,
        init: str = "kaiming",
        pretrained: str | Path | None = None,
        freeze_stages: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        names = [task.name for task in tasks]
        if not names:
            raise ConfigError("a multi-task model needs at least one task.")
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be unique, got {names}.")
        unknown_heads = sorted(set(heads or {}) - set(names))
        if unknown_heads:
            raise ConfigError(f"heads given for unknown tasks {unknown_heads}; the tasks are {names}.")
        if init != PRETRAINED and init not in INIT_SCHEMES:
            raise UnknownNameError(
                f"Unknown model.init {init!r}. Allowed: {', '.join(INIT_SCHEMES.names())}, {PRETRAINED} (with "
                "model.pretrained: a local weights file)."
            )
        if init == PRETRAINED and pretrained is None:
            raise ConfigError(
                "model.init=pretrained needs a local weights file: set model.pretrained to a timm or "
                "torchvision checkpoint of the backbone (.safetensors, .pth or .pt). Nothing is downloaded."
            )
        if len(mean) != len(std):
            raise ConfigError(f"mean {tuple(mean)} and std {tuple(std)} must have one value per channel.")
        self.task_names = names
        self._tasks = {task.name: task for task in tasks}
        self.backbone_name = backbone if isinstance(backbone, str) else getattr(backbone, "__name__", "custom")
        self.architecture_spec = architecture if architecture is not None else HPS()
        self.init_scheme = init
        self.pretrained = str(pretrained) if pretrained is not None else None
        head_init = "kaiming" if init == PRETRAINED else init

        factory = self._backbone_factory(backbone, pretrained, head_init, in_chans=len(mean))
        self.architecture = self.architecture_spec.build_for(factory, list(tasks))
        if self.architecture.intermediate_tasks and DEEP_SUPERVISION in names:
            raise ConfigError(
                f"task name {DEEP_SUPERVISION!r} is taken by the intermediate predictions of architecture "
                f"{self.architecture_spec.name!r}; rename the task."
            )
        channels, strides = self.architecture.feature_channels, self.architecture.feature_strides
        head_modules = {}
        for task in tasks:
            head = task.build_custom_head(channels, strides)
            if head is None:
                choice = (heads or {}).get(task.name) or task.default_head
                head = build_head(choice, channels, strides, task.output_channels)
                initialise(head, head_init)
            head_modules[task.name] = head
        self.heads = nn.ModuleDict(head_modules)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if freeze_stages:
            self.freeze_backbone_stages(freeze_stages)

    @staticmethod
    def _backbone_factory(
        backbone: str | Callable[[], Backbone], pretrained: str | Path | None, scheme: str, in_chans: int
    ) -> Callable[[], Backbone]:
        """A factory giving a fresh backbone, pretrained or initialised, each time an architecture asks."""

        def make() -> Backbone:
            module = create_backbone(backbone, in_chans=in_chans) if isinstance(backbone, str) else backbone()
            if pretrained is not None:
                module.load_pretrained(pretrained)
            else:
                initialise(module, scheme)
            return module

        return make

    # ------------------------------------------------------------------------------------------ forward
    @property
    def tasks(self) -> dict[str, Task]:
        return dict(self._tasks)

    def normalise(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != self.mean.shape[1]:
            raise ConfigError(
                f"the model takes images of shape [B, {self.mean.shape[1]}, H, W]; got {tuple(images.shape)}."
            )
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> dict[str, Any]:
        features = self.architecture(self.normalise(images))
        return self._predict(features, images.shape[-2:])

    def forward_with_representation(self, images: Tensor) -> tuple[dict[str, Any], list[Tensor]]:
        """Predictions and the shared representation they were computed from; raises
        :class:`RepresentationUnavailable` when the architecture has none. For per-task gradients of the
        representation use :meth:`forward_cut`: these tensors may be computed from one another."""
        representation = self.encode(images)
        return self.predict_from_representation(representation, images.shape[-2:]), representation

    def forward_cut(self, images: Tensor) -> tuple[dict[str, Any], CutRepresentation]:
        """Predictions computed from a :class:`CutRepresentation` of the shared representation."""
        cut = CutRepresentation.of(self.encode(images))
        return self.predict_from_representation(cut.inputs, images.shape[-2:]), cut

    def encode(self, images: Tensor) -> list[Tensor]:
        """The architecture's shared representation of ``images`` (the trunk's output)."""
        return self.architecture.encode(self.normalise(images))

    def predict_from_representation(self, representation: list[Tensor], image_size: Sequence[int]) -> dict[str, Any]:
        """Every task's prediction from the output of :meth:`encode`."""
        return self._predict(self.architecture.decode(representation), image_size)

    def _predict(self, features: Mapping[str, list[Tensor]], image_size: Sequence[int]) -> dict[str, Any]:
        size = (int(image_size[0]), int(image_size[1]))
        predictions: dict[str, Any] = {
            name: self._tasks[name].postprocess(self.heads[name](features[name], size)) for name in self.task_names
        }
        if self.training and self.architecture.intermediate_tasks:
            # deep supervision: each intermediate prediction resized to the image, as the task's head output is
            predictions[DEEP_SUPERVISION] = {
                name: [
                    self._tasks[name].postprocess(F.interpolate(raw, size=size, mode="bilinear", align_corners=False))
                    for raw in features[intermediate_key(name)]
                ]
                for name in self.architecture.intermediate_tasks
            }
        return predictions

    # --------------------------------------------------------------------------------------- parameters
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters more than one task depends on (what gradient balancers act on)."""
        return self.architecture.shared_parameters()

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not shared: heads and the architecture's per-task parts."""
        shared = {id(p) for p in self.shared_parameters()}
        return (p for p in self.parameters() if id(p) not in shared)

    def backbone_stages(self) -> list[BackboneStage]:
        """Every backbone stage inside the architecture, also those it copied out of a backbone."""
        return [m for m in self.architecture.modules() if isinstance(m, BackboneStage)]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the backbone stages, wherever the architecture placed them."""
        seen: set[int] = set()
        for stage in self.backbone_stages():
            for parameter in stage.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    yield parameter

    def parameter_groups(self, backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """Two optimiser groups: ``backbone`` (learning rate scaled by ``backbone_lr_scale``) and ``heads``
        (everything else), as ``{"name", "params", "lr_scale"}`` dicts."""
        backbone = list(self.backbone_parameters())
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if id(p) not in ids]
        groups = [
            {"name": "backbone", "params": backbone, "lr_scale": float(backbone_lr_scale)},
            {"name": "heads", "params": rest, "lr_scale": 1.0},
        ]
        return [g for g in groups if g["params"]]

    def freeze_backbone_stages(self, n: int) -> None:
        """Freeze the first ``n`` backbone stages (every copy of them); see :class:`BackboneStage`."""
        stages = self.backbone_stages()
        count = 1 + max((stage.index for stage in stages), default=-1)
        if not 0 <= n <= count:
            raise ConfigError(
                f"model.freeze_stages={n} is out of range: the backbone has {count} stages "
                f"(0 freezes nothing, {count} freezes all)."
            )
        for stage in stages:
            stage.freeze(stage.index < n)

    def merged(self) -> MultiTaskModel:
        """This model for inference and export with the architecture's adapters folded into plain weights
        (see :meth:`Architecture.merged`): a copy when there are adapters, else the model itself."""
        architecture = self.architecture.merged()
        if architecture is self.architecture:
            return self
        clone = copy.copy(self)
        clone._modules = {**self._modules, "architecture": architecture}
        return clone

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone_name,
            "architecture": self.architecture_spec.describe(),
            "heads": {name: type(head).__name__ for name, head in self.heads.items()},
            "init": self.init_scheme,
            "pretrained": self.pretrained,
        }
