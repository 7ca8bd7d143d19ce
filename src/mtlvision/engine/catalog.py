"""What can be chosen (``mtlvision list``): the registries, and the sizes of every architecture.

``mtlvision list KIND`` must answer in well under a second, so it reads a static copy of the registries
(name, description, citation of every entry, and the note under a list) shipped as package data,
``mtlvision/presets/catalog.json``, instead of importing torch and every module that registers something.
:func:`live_catalog` builds the same content from the registries themselves; a test asserts that the two are
equal, and ``python -m mtlvision.engine.catalog`` rewrites the file after a registry changes.

This module imports nothing heavy at module level: the live registries and the architecture sizes import
torch inside the functions that need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlvision.errors import MtlvisionError
from mtlvision.registry import REGISTRY_KINDS

if TYPE_CHECKING:
    from mtlvision.config import RunConfig

CATALOG_FILE = "catalog.json"
CATALOG_PACKAGE = "mtlvision.presets"


@dataclass(frozen=True)
class CatalogEntry:
    """One entry of a registry as ``mtlvision list`` shows it (no object: nothing is imported)."""

    name: str
    description: str
    citation: str = ""


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


def _check_kind(kind: str) -> None:
    if kind not in REGISTRY_KINDS:
        raise MtlvisionError(f"unknown registry {kind!r}; choose one of {', '.join(REGISTRY_KINDS)}")


def registry(kind: str) -> list[Any]:
    """The live entries (name, object, description, citation) of one registry (imports every registrant)."""
    _check_kind(kind)
    return list(_registries()[kind])


def _live_note(kind: str) -> str | None:
    if kind != "backbones":
        return None
    from mtlvision.models.backbones import ANY_TIMM_NOTE

    return f"Beyond these, {ANY_TIMM_NOTE}; torchvision models as tv/<name>."


def live_catalog() -> dict[str, Any]:
    """The content of ``catalog.json`` built from the live registries (imports torch)."""
    return {
        "kinds": {
            kind: [{"name": e.name, "description": e.description, "citation": e.citation} for e in entries]
            for kind, entries in _registries().items()
        },
        "notes": {kind: note for kind in REGISTRY_KINDS if (note := _live_note(kind)) is not None},
    }


def static_catalog() -> dict[str, Any]:
    """The catalog shipped with the package (see the module docstring)."""
    return json.loads(resources.files(CATALOG_PACKAGE).joinpath(CATALOG_FILE).read_text(encoding="utf-8"))


def catalog(kind: str) -> list[CatalogEntry]:
    """The entries of one registry from the shipped catalog, fast (``mtlvision list KIND``)."""
    _check_kind(kind)
    return [CatalogEntry(**entry) for entry in static_catalog()["kinds"][kind]]


def registry_note(kind: str) -> str | None:
    """What a registry's list leaves out, said under it (backbones: any timm or torchvision model)."""
    _check_kind(kind)
    return static_catalog()["notes"].get(kind)


def write_catalog(path: str | Path | None = None) -> Path:
    """Write :func:`live_catalog` to ``path`` (default: the package's ``catalog.json``)."""
    target = Path(path) if path is not None else Path(__file__).resolve().parent.parent / "presets" / CATALOG_FILE
    target.write_text(json.dumps(live_catalog(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def sizes_config(config: RunConfig | None) -> RunConfig:
    """The setting of ``list architectures`` sizes: ``config``, else scenes with count and segmentation."""
    from mtlvision.config import load_config

    return config if config is not None else load_config("scenes", {"tasks": ["count", "segmentation"]})


def architecture_sizes(config: RunConfig | None = None) -> dict[str, dict[str, Any]]:
    """Parameters and MACs (whole model and shared part) of every architecture for one configuration; an
    architecture that refuses the configuration (MTI-Net with fewer than two pixel-map tasks, SegNet at an
    input size it does not take) is left out."""
    from mtlvision.engine.build import build_model, build_tasks, image_size
    from mtlvision.errors import ConfigError
    from mtlvision.models.architectures import ARCHITECTURES
    from mtlvision.models.complexity import model_complexity

    cfg = sizes_config(config)
    tasks = build_tasks(cfg)
    size = image_size(cfg) or (224, 224)
    sizes = {}
    for entry in ARCHITECTURES:
        # an architecture bound to one backbone (segnet_mtan) is measured on it, and says so
        own = entry.obj.backbone
        update = {"architecture": entry.name, **({"backbone": own} if own and own != cfg.model.backbone else {})}
        try:
            model = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update=update)}), tasks)
        except ConfigError:
            continue  # the architecture cannot serve these tasks (its error says why when one trains it)
        try:
            sizes[entry.name] = model_complexity(model, image_size=size)
        except ConfigError:
            if own is None:
                raise
            continue  # its backbone does not take this input size (SegNet: multiples of 32); no size shown
        if "backbone" in update:
            sizes[entry.name]["backbone"] = own
    return sizes


def architecture_sizes_setting(config: RunConfig | None = None) -> str:
    """A one-line description of the setting :func:`architecture_sizes` measured."""
    from mtlvision.engine.build import build_tasks, image_size

    cfg = sizes_config(config)
    tasks = ", ".join(t.name for t in build_tasks(cfg))
    return f"backbone {cfg.model.backbone}, tasks {tasks}, input {image_size(cfg) or (224, 224)}, batch of one"


if __name__ == "__main__":
    print(f"wrote {write_catalog()}")
