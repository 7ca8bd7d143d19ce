"""Datasets: importing this package registers every built-in loader in :data:`DATASETS`."""

from __future__ import annotations

from mtlvision.data.datasets import multimnist, scenes
from mtlvision.data.datasets import coco, yolo  # noqa: F401
from mtlvision.data.datasets import celeba, cityscapes, folder, nyuv2, office, pascal_context  # noqa: F401
from mtlvision.data.datasets import multi  # noqa: F401
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, TaskSpec

__all__ = ["DATASETS", "DatasetParams", "DatasetSource", "TaskSpec", "multimnist", "scenes"]
