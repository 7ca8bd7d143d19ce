"""mtlvision: multi-task learning for computer vision on PyTorch.

>>> import mtlvision as mv
>>> run = mv.train("scenes", overrides={"balancer.name": "pcgrad", "train.epochs": 5})
>>> model = mv.MultiTaskModel("resnet18", [mv.tasks.Segmentation("seg", num_classes=13), mv.tasks.Depth("depth")],
...                           architecture=mv.architectures.MTAN())
>>> mv.balancers.aggregate("upgrad", G)   # any gradient method on a [T, P] matrix
>>> mtl = mv.MultiTaskBackward(model.architecture, "upgrad")   # our balancers in your own loop

Names are imported on first use (PEP 562), so ``import mtlvision`` and the command line's ``--help`` do not
pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from mtlvision._version import __version__

#: public name -> the module that defines it (a module itself where the value is None)
_EXPORTS: dict[str, str] = {
    "api": "mtlvision.api",
    "affinity": "mtlvision.api",
    "against_published": "mtlvision.api",
    "balancers": "mtlvision.balancers",
    "tasks": "mtlvision.tasks",
    "architectures": "mtlvision.models.architectures",
    "baseline": "mtlvision.api",
    "build_tasks": "mtlvision.api",
    "catalog": "mtlvision.api",
    "check_data": "mtlvision.api",
    "compare": "mtlvision.api",
    "evaluate": "mtlvision.api",
    "export": "mtlvision.api",
    "load_model": "mtlvision.api",
    "merge": "mtlvision.api",
    "predict": "mtlvision.api",
    "registry": "mtlvision.api",
    "serve": "mtlvision.api",
    "serve_app": "mtlvision.api",
    "split": "mtlvision.api",
    "train": "mtlvision.api",
    "tune": "mtlvision.api",
    "RunConfig": "mtlvision.config",
    "load_config": "mtlvision.config",
    "Run": "mtlvision.engine.runs",
    "RunReport": "mtlvision.engine.runs",
    "Trainer": "mtlvision.engine.trainer",
    "ConfigError": "mtlvision.errors",
    "DataError": "mtlvision.errors",
    "MtlvisionError": "mtlvision.errors",
    "MultiTaskModel": "mtlvision.models",
    "MultiTaskBackward": "mtlvision.balancers.backward",
    "mtl_backward": "mtlvision.balancers.backward",
    "create_backbone": "mtlvision.models",
}
_MODULES = {"api", "balancers", "tasks", "architectures"}

if TYPE_CHECKING:
    from mtlvision import api, balancers, tasks
    from mtlvision.api import (
        affinity,
        against_published,
        baseline,
        build_tasks,
        catalog,
        check_data,
        compare,
        evaluate,
        export,
        load_model,
        merge,
        predict,
        registry,
        serve,
        serve_app,
        split,
        train,
        tune,
    )
    from mtlvision.balancers.backward import MultiTaskBackward, mtl_backward
    from mtlvision.config import RunConfig, load_config
    from mtlvision.engine.runs import Run, RunReport
    from mtlvision.engine.trainer import Trainer
    from mtlvision.errors import ConfigError, DataError, MtlvisionError
    from mtlvision.models import MultiTaskModel, architectures, create_backbone


class _Package(types.ModuleType):
    """The package's own type: a submodule that shares its name with an exported function (``export``,
    ``registry``) does not replace that function when it is imported (the import system sets a package's
    attribute to every submodule it loads, which made ``mv.export`` a module after ``mtlvision.export`` was
    imported)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS and name not in _MODULES:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mtlvision' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name in _MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
