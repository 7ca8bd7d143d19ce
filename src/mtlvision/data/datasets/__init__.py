"""Datasets: importing this package registers every built-in loader in :data:`DATASETS`."""

from __future__ import annotations

from mtlvision.data.datasets import (  # noqa: F401  # noqa: F401
    celeba,
    cityscapes,
    coco,
    folder,
    multi,
    multimnist,
    nyuv2,
    office,
    pascal_context,
    scenes,
    yolo,
)
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, TaskSpec

__all__ = ["DATASETS", "DatasetParams", "DatasetSource", "TaskSpec", "multimnist", "scenes"]
