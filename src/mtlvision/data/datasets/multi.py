"""``multi``: several datasets in one run, each labelling its own tasks (multi-input MTL from one config).

Each entry of ``data.sources`` is a dataset with its own keys (``name``, ``root``, its parameters) and a
``tasks`` mapping from the run's task name to the task of that dataset that provides it. Every split is a
:class:`~mtlvision.data.sampling.MultiSourceDataset` over the sources: a sample carries the labels of its own
source's tasks and placeholders (``valid`` False) for the others, so each task's loss and metrics cover only
its own source's samples. Training batches are drawn by
:class:`~mtlvision.data.sampling.MultiSourceBatchSampler` as ``data.sampling`` says (strategy, mixing,
temperature, steps per epoch). Sources whose images differ in size need ``data.augment.resize``. Example::

    data:
      name: multi
      augment: {resize: [64, 64]}
      sampling: {strategy: proportional, mixing: mixed}
      sources:
        scenes: {name: scenes, image_size: 64, tasks: {segmentation: segmentation}}
        digits: {name: multimnist, tasks: {digit: left}}
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.utils.data import Dataset

from mtlvision.data.datasets._files import build_tasks, require_split
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, TaskSpec
from mtlvision.data.sampling import MultiSourceDataset, SamplingParams, TaskView
from mtlvision.errors import ConfigError
from mtlvision.validation import config_error_from


class SourceEntry(BaseModel):
    """``data.sources.<source>``: a dataset (``name``, ``root``, its own keys) and the tasks taken from it."""

    model_config = ConfigDict(extra="allow")

    name: str
    root: str | None = None
    tasks: dict[str, str] = Field(description="run's task name -> the source dataset's task name")

    @property
    def dataset_params(self) -> dict[str, Any]:
        return {**(self.model_extra or {}), "name": self.name, "root": self.root}


class MultiParams(DatasetParams):
    """``data.*`` keys of ``multi``."""

    sources: dict[str, SourceEntry]
    sampling: SamplingParams = Field(default_factory=SamplingParams)


def _source(key: str, entry: SourceEntry, inherited: dict[str, Any]) -> tuple[type[DatasetSource], DatasetParams]:
    if entry.name == "multi":
        raise ConfigError(f"data.sources.{key}.name: a multi dataset cannot hold another multi dataset.")
    source = DATASETS.get(entry.name)
    try:
        return source, source.Params.model_validate({**inherited, **entry.dataset_params})
    except ValidationError as exc:
        raise config_error_from(
            exc,
            f"data.sources.{key}",
            f"Invalid parameters for source {key!r} (dataset {entry.name!r})",
            allowed=[*source.Params.model_fields, "tasks"],
            model=source.Params,
        ) from None


def _sources(params: MultiParams) -> dict[str, tuple[type[DatasetSource], DatasetParams, SourceEntry]]:
    if not params.sources:
        raise ConfigError("data.sources is empty: list each source dataset with its name and tasks.")
    out = {}
    # data.max_pixels set beside data.sources applies to every source that does not set its own
    inherited = {"max_pixels": params.max_pixels} if "max_pixels" in params.model_fields_set else {}
    for key, entry in params.sources.items():
        if not entry.tasks:
            raise ConfigError(f"data.sources.{key}.tasks is empty: map a run task to a task of {entry.name}.")
        source, source_params = _source(key, entry, inherited)
        out[key] = (source, source_params, entry)
    return out


@DATASETS.register("multi", "Several datasets in one run, each labelling its own tasks (mixed per step).")
class Multi(DatasetSource):
    """Per-task datasets from one config (see the module docstring)."""

    Params: ClassVar[type[DatasetParams]] = MultiParams

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        assert isinstance(params, MultiParams)
        specs: dict[str, TaskSpec] = {}
        owner: dict[str, str] = {}
        for key, (source, source_params, entry) in _sources(params).items():
            available = source.tasks(source_params)
            for ours, theirs in entry.tasks.items():
                if theirs not in available:
                    raise ConfigError(
                        f"data.sources.{key}.tasks.{ours}: dataset {entry.name!r} has no task {theirs!r}. "
                        f"Available: {', '.join(available)}."
                    )
                if ours in owner:
                    raise ConfigError(
                        f"data.sources.{key}.tasks: task {ours!r} is already taken from source {owner[ours]!r}; "
                        "give each run task one source."
                    )
                owner[ours] = key
                specs[ours] = available[theirs]
        return specs

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> Dataset:
        assert isinstance(params, MultiParams)
        require_split(split)
        views = {
            key: TaskView(source.build(source_params, split), entry.tasks)
            for key, (source, source_params, entry) in _sources(params).items()
        }
        tasks = build_tasks(cls.tasks(params))
        return MultiSourceDataset(
            views, {name: task.placeholder_target for name, task in tasks.items()}, params.sampling
        )
