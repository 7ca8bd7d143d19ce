"""What can be chosen (``mtlvision list``): the registries, and the sizes of every architecture."""

from __future__ import annotations

from typing import Any

from mtlvision.config import RunConfig, load_config
from mtlvision.engine.build import build_model, build_tasks, image_size
from mtlvision.errors import MtlvisionError
from mtlvision.models.complexity import model_complexity

from mtlvision.registry import REGISTRY_KINDS


def _registries() -> dict[str, Any]:
    from mtlvision.balancers import BALANCERS
    from mtlvision.data.datasets import DATASETS
    from mtlvision.engine.merge import MERGE_RULES
    from mtlvision.models.architectures import ARCHITECTURES
    from mtlvision.models.backbones import BACKBONES
    from mtlvision.tasks import TASKS

    registries = {
        "tasks": TASKS,
        "balancers": BALANCERS,
        "architectures": ARCHITECTURES,
        "backbones": BACKBONES,
        "datasets": DATASETS,
        "merges": MERGE_RULES,
    }
    assert tuple(registries) == REGISTRY_KINDS
    return registries


def registry(kind: str) -> list[Any]:
    """The entries (name, description, citation) of one registry, for ``mtlvision list KIND``."""
    registries = _registries()
    if kind not in registries:
        raise MtlvisionError(f"unknown registry {kind!r}; choose one of {', '.join(REGISTRY_KINDS)}")
    return list(registries[kind])


def registry_note(kind: str) -> str | None:
    """What a registry's list leaves out, said under it (backbones: any timm or torchvision model)."""
    if kind != "backbones":
        return None
    from mtlvision.models.backbones import ANY_TIMM_NOTE

    return f"Beyond these, {ANY_TIMM_NOTE}; torchvision models as tv/<name>."


def sizes_config(config: RunConfig | None) -> RunConfig:
    """The setting of ``list architectures`` sizes: ``config``, else scenes with count and segmentation."""
    return config if config is not None else load_config("scenes", {"tasks": ["count", "segmentation"]})


def architecture_sizes(config: RunConfig | None = None) -> dict[str, dict[str, Any]]:
    """Parameters and MACs (whole model and shared part) of every architecture for one configuration."""
    from mtlvision.models.architectures import ARCHITECTURES

    cfg = sizes_config(config)
    tasks = build_tasks(cfg)
    size = image_size(cfg) or (224, 224)
    sizes = {}
    for entry in ARCHITECTURES:
        model = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"architecture": entry.name})}),
                            tasks)
        sizes[entry.name] = model_complexity(model, image_size=size)
    return sizes


def architecture_sizes_setting(config: RunConfig | None = None) -> str:
    """A one-line description of the setting :func:`architecture_sizes` measured."""
    cfg = sizes_config(config)
    tasks = ", ".join(t.name for t in build_tasks(cfg))
    return f"backbone {cfg.model.backbone}, tasks {tasks}, input {image_size(cfg) or (224, 224)}, batch of one"
