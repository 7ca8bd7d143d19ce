"""The dataset contract shared by every built-in and real-data loader.

A dataset split is a ``torch.utils.data.Dataset`` whose items are samples::

    {
        "image": float32 Tensor [3, H, W] with values in [0, 1] (normalisation happens in the model),
        "targets": {task_name: target},   # one entry per task the dataset provides, in the format of the
                                          # task's TargetKind (mtlvision.tasks.base.TargetKind)
        "valid": {task_name: bool},       # False where the sample has no label for that task; its target
                                          # is then the task's placeholder and costs nothing in the loss
        "id": str,                        # a stable sample id (file name or "split/index") for messages
    }

Each dataset is registered in :data:`DATASETS` as a :class:`DatasetSource`: a pydantic ``Params`` model
(its config keys beside ``data.name``), the tasks it provides and a ``build`` that makes a split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

from mtlvision.registry import Registry

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """A task a dataset provides: the task kind (registry name) and its constructor arguments."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


class DatasetParams(BaseModel):
    """Config keys common to every dataset (``data.*``). Datasets subclass this with their own keys."""

    model_config = ConfigDict(extra="forbid")

    name: str
    root: str | None = None


class DatasetSource(ABC):
    """A registered dataset: validates its parameters, lists its tasks and builds its splits."""

    Params: ClassVar[type[DatasetParams]] = DatasetParams

    @classmethod
    @abstractmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        """Every task this dataset can provide, by name, in a stable order (the preset default uses all)."""

    @classmethod
    @abstractmethod
    def build(cls, params: DatasetParams, split: str) -> Dataset:
        """The dataset split ``split`` (one of :data:`SPLITS`); raises DataError naming missing files."""


DATASETS: Registry[type[DatasetSource]] = Registry("dataset")
