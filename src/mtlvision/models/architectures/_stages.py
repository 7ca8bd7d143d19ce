"""Access to a backbone's stages, shared by the architectures that copy, split or interleave them.

Every architecture here relies on one property of a backbone: it exposes ``stages`` (an ``nn.ModuleList``
whose first entry holds the stem) and its ``forward`` returns the output of each stage, the stages applied
one after the other. That makes the architectures independent of the backbone family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.backbones import Backbone


def backbone_stages(backbone: nn.Module, architecture: str, minimum: int, why: str) -> nn.ModuleList:
    """The backbone's ``stages``, or a :class:`ConfigError` naming what ``architecture`` needs and why."""
    stages = getattr(backbone, "stages", None)
    if not isinstance(stages, nn.ModuleList):
        raise ConfigError(
            f"architecture {architecture!r} needs a backbone that exposes its stages as an nn.ModuleList "
            f"(attribute 'stages'); {type(backbone).__name__} does not. Pick a backbone from "
            "`mtlvision list backbones`."
        )
    if getattr(backbone, "chained_stages", True) is False:
        raise ConfigError(
            f"architecture {architecture!r} works on a chain of backbone stages whose outputs are the features; "
            f"backbone {getattr(backbone, 'name', type(backbone).__name__)!r} computes its features after its "
            "stages (a ViT and its feature pyramid). Use an architecture that takes any backbone as a whole "
            "(hps, mtlora) or a convolutional backbone."
        )
    if len(stages) < minimum:
        raise ConfigError(
            f"architecture {architecture!r} needs a backbone with at least {minimum} stages ({why}); "
            f"{type(backbone).__name__} has {len(stages)}. Pick a deeper backbone or change the "
            "architecture's hyper-parameters."
        )
    return stages


def feature_layout(backbone: Backbone) -> tuple[list[int], list[int]]:
    """The backbone's per-stage channels and strides, which every architecture here hands to the heads."""
    return list(backbone.feature_channels), list(backbone.feature_strides)


def run_stages(stages: Iterable[nn.Module], x: Tensor) -> list[Tensor]:
    """Apply ``stages`` one after the other and return every stage's output."""
    outputs = []
    for stage in stages:
        x = stage(x)
        outputs.append(x)
    return outputs


def stage_copies(backbone_factory: Callable[[], Backbone], count: int, start: int, stop: int | None) -> nn.ModuleList:
    """``count`` independent copies of stages ``start:stop``, each from a fresh backbone of the factory.

    A fresh backbone per copy keeps any pretrained weights the factory loads; the unused stages are dropped.
    """
    return nn.ModuleList(nn.ModuleList(list(backbone_factory().stages)[start:stop]) for _ in range(count))


def require_at_least(architecture: str, field: str, value: int, minimum: int) -> None:
    """A :class:`ConfigError` naming ``model.architecture.<field>`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"architecture {architecture!r}: hyper-parameter {field}={value!r} must be an integer of at least "
            f"{minimum}."
        )


def image_channels(stages: nn.ModuleList, architecture: str) -> int:
    """The number of image channels the backbone takes: the input channels of the stem's first convolution."""
    for module in stages[0].modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ConfigError(
        f"architecture {architecture!r} sizes its gates from the backbone's first convolution, and the first "
        "stage of this backbone has none."
    )
