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

A split of a dataset read from files may also tell, without reading anything, where a sample comes from:
``sample_source(index) -> SampleSource`` (its id, image file and label files; it raises the DataError that
reading would raise for a path that leaves the dataset's folder), and ``known_targets(index)``, the labels it
holds in memory (CSV cells). The checks use them to name the file of a sample that cannot be read and, before
training, to find the same image in two splits and labels out of range without decoding any image
(:mod:`mtlvision.data.preflight`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from mtlvision.data.io import DEFAULT_MAX_PIXELS
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
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=0,
        description=(
            "images (and label maps) with more pixels are refused before decoding, naming the file; 0: no limit"
        ),
    )


@dataclass(frozen=True)
class SampleSource:
    """Where a sample comes from, known without reading it: the ``id`` its loaded sample carries, its image
    file and the label files of the tasks that have one (task name -> path)."""

    id: str
    image: Path | None = None
    label_files: Mapping[str, Path] = field(default_factory=dict)


class DatasetSource(ABC):
    """A registered dataset: validates its parameters, lists its tasks and builds its splits."""

    Params: ClassVar[type[DatasetParams]] = DatasetParams

    @classmethod
    @abstractmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        """Every task this dataset can provide, by name, in a stable order (the preset default uses all)."""

    @classmethod
    def default_tasks(cls, params: DatasetParams) -> list[str]:
        """The tasks a run trains when its config names none: all of :meth:`tasks` unless overridden."""
        return list(cls.tasks(params))

    @classmethod
    @abstractmethod
    def build(cls, params: DatasetParams, split: str) -> Dataset:
        """The dataset split ``split`` (one of :data:`SPLITS`); raises DataError naming missing files."""


DATASETS: Registry[type[DatasetSource]] = Registry("dataset")


def sample_source_of(dataset: Dataset, index: int) -> SampleSource | None:
    """``dataset.sample_source(index)`` (through ``torch.utils.data.Subset`` and other wrappers holding
    ``.dataset``), or None when the dataset cannot tell (built-in synthetic data)."""
    while not hasattr(dataset, "sample_source"):
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            return None
        indices = getattr(dataset, "indices", None)
        if indices is not None:
            index = int(indices[index])
        dataset = inner
    return dataset.sample_source(index)


def known_targets_of(dataset: Dataset, index: int) -> dict[str, Any]:
    """The labels ``dataset`` holds in memory for sample ``index`` (see the module docstring); empty when none."""
    while not hasattr(dataset, "known_targets"):
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            return {}
        indices = getattr(dataset, "indices", None)
        if indices is not None:
            index = int(indices[index])
        dataset = inner
    return dataset.known_targets(index)
