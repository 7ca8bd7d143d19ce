"""mtlvision: multi-task learning for computer vision on PyTorch.

>>> import mtlvision as mv
>>> run = mv.train("scenes", overrides={"balancer.name": "pcgrad", "train.epochs": 5})
>>> model = mv.MultiTaskModel("resnet18", [mv.tasks.Segmentation("seg", num_classes=13), mv.tasks.Depth("depth")],
...                           architecture=mv.architectures.MTAN())
>>> mv.balancers.aggregate("upgrad", G)   # any gradient method on a [T, P] matrix
"""

from __future__ import annotations

from mtlvision import balancers, tasks
from mtlvision._version import __version__
from mtlvision.api import (
    baseline,
    check_data,
    compare,
    evaluate,
    export,
    load_model,
    merge,
    predict,
    registry,
    train,
)
from mtlvision.config import RunConfig, load_config
from mtlvision.engine.runs import Run
from mtlvision.engine.trainer import Trainer
from mtlvision.errors import ConfigError, DataError, MtlvisionError
from mtlvision.models import MultiTaskModel, architectures, create_backbone

__all__ = [
    "ConfigError",
    "DataError",
    "MtlvisionError",
    "MultiTaskModel",
    "Run",
    "RunConfig",
    "Trainer",
    "__version__",
    "architectures",
    "balancers",
    "baseline",
    "check_data",
    "compare",
    "create_backbone",
    "evaluate",
    "export",
    "load_config",
    "load_model",
    "merge",
    "predict",
    "registry",
    "tasks",
    "train",
]
