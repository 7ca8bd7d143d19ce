"""The sharing-architecture contract: images in, per-task multi-scale features out.

An architecture owns the backbone (or its copies, for cross-stitch) and everything between the backbone
and the task heads. It is built from an :class:`ArchitectureSpec` (a small, typed, hyper-parameter holder
that the user creates, e.g. ``MTAN()``), a backbone factory and the task names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.backbones import Backbone
from mtlvision.tasks.base import Task

#: the key of the model's predictions that holds, in training mode, each task's intermediate predictions
DEEP_SUPERVISION = "deep_supervision"


def intermediate_key(task: str) -> str:
    """The key of an architecture's output that holds ``task``'s intermediate predictions (raw, any size)."""
    return f"{DEEP_SUPERVISION}/{task}"


class RepresentationUnavailable(ConfigError):
    """Raised when representation-gradient mode is asked of an architecture without one shared representation."""


class Architecture(nn.Module, ABC):
    """Maps images to ``{task_name: [feature maps, fine to coarse]}``.

    ``feature_channels`` / ``feature_strides`` describe the list each task receives (same for every task).
    An architecture with deep supervision (MTI-Net) names in ``intermediate_tasks`` the tasks whose raw
    intermediate predictions its output also holds, under :func:`intermediate_key`; the model resizes them
    to the image and, in training mode, returns them under :data:`DEEP_SUPERVISION`, and their task losses
    join the task's loss.
    """

    feature_channels: list[int]
    feature_strides: list[int]
    intermediate_tasks: tuple[str, ...] = ()

    @abstractmethod
    def forward(self, images: Tensor) -> dict[str, list[Tensor]]: ...

    @abstractmethod
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that more than one task depends on (the ones gradient balancers act on)."""

    def set_progress(self, epoch: int, epochs: int) -> None:
        """Told by the trainer at the start of every epoch (0-based) of ``epochs``; architectures whose
        forward follows a training schedule (LTB's temperature) override it (default: nothing to do)."""

    def merged(self) -> Architecture:
        """This architecture for inference and export, any adapters folded into plain weights (default: itself)."""
        return self

    def encode(self, images: Tensor) -> list[Tensor]:
        """The one representation every task consumes (for representation-gradient balancing)."""
        raise RepresentationUnavailable(
            f"architecture {type(self).__name__} has no single shared representation; use balancer.mode=params"
        )

    def decode(self, representation: list[Tensor]) -> dict[str, list[Tensor]]:
        """Per-task features from the output of :meth:`encode`."""
        raise RepresentationUnavailable(
            f"architecture {type(self).__name__} has no single shared representation; use balancer.mode=params"
        )


class ArchitectureSpec(ABC):
    """A user-facing architecture choice with its hyper-parameters; :meth:`build` makes the module."""

    name: ClassVar[str]
    #: the one backbone the architecture is built on (None: any backbone that exposes its stages)
    backbone: ClassVar[str | None] = None

    @abstractmethod
    def build(self, backbone_factory: Callable[[], Backbone], task_names: Sequence[str]) -> Architecture: ...

    def build_for(self, backbone_factory: Callable[[], Backbone], tasks: Sequence[Task]) -> Architecture:
        """The module for ``tasks``; by default :meth:`build` with their names (architectures that need a task's
        output, such as MTI-Net's intermediate predictions, override this)."""
        return self.build(backbone_factory, [task.name for task in tasks])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
