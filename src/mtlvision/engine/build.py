"""From a validated :class:`~mtlvision.config.RunConfig` to tasks, datasets, model, balancer and trainer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch.utils.data import Dataset, Sampler

from mtlvision.balancers import Balancer
from mtlvision.balancers import get as get_balancer
from mtlvision.config import DataConfig, RunConfig, TaskEntry
from mtlvision.data.datasets import DATASETS, DatasetParams, DatasetSource, TaskSpec
from mtlvision.data.guard import SkipBadSamples, guard_split
from mtlvision.data.transforms import JointTransform, build_transforms, target_specs
from mtlvision.engine.checkpoint import load_weights, modulation_layout, read_weights
from mtlvision.engine.merging.wemoe import LAYOUT_NAME as WEMOE_LAYOUT
from mtlvision.engine.merging.wemoe import rebuild as rebuild_wemoe
from mtlvision.engine.runs import WEIGHTS_NAME, Run
from mtlvision.errors import CheckpointError, ConfigError, DataError
from mtlvision.models import MultiTaskModel
from mtlvision.models.architectures import ARCHITECTURES
from mtlvision.models.init import INIT_SCHEMES, PRETRAINED
from mtlvision.models.modulated import ModulationLayout, TaskModulatedModel
from mtlvision.tasks import TASKS, Task
from mtlvision.validation import config_error_from

logger = logging.getLogger(__name__)


def dataset_source(config: RunConfig) -> tuple[type[DatasetSource], DatasetParams]:
    """The registered dataset and its validated parameters (errors name the ``data.*`` key)."""
    source = DATASETS.get(config.data.name)
    try:
        params = source.Params.model_validate(config.data.dataset_params)
    except ValidationError as exc:
        allowed = dict.fromkeys([*DataConfig.model_fields, *source.Params.model_fields])
        raise config_error_from(
            exc, "data", f"Invalid dataset parameters for {config.data.name!r}", allowed=allowed, model=source.Params
        ) from None
    return source, params


def build_tasks(config: RunConfig) -> list[Task]:
    """The run's tasks: those named in ``tasks`` (the dataset's default tasks when omitted), in that order."""
    source, params = dataset_source(config)
    available: dict[str, TaskSpec] = source.tasks(params)
    defaults = source.default_tasks(params)
    entries = config.tasks if config.tasks is not None else [TaskEntry(name=n) for n in defaults]
    tasks: list[Task] = []
    for entry in entries:
        name = entry.name
        if name not in available:
            raise ConfigError(
                f"tasks: dataset {config.data.name!r} has no task {name!r}. Available: {', '.join(available)}."
            )
        spec = available[name]
        try:
            tasks.append(TASKS.get(spec.kind)(name, **{**spec.params, **entry.task_params}))
        except TypeError as exc:
            raise ConfigError(f"tasks: bad parameters for task {name!r} ({spec.kind}): {exc}") from None
    return tasks


def head_choices(config: RunConfig) -> dict[str, Any]:
    """Per-task head choices from the ``tasks`` entries (``head`` and ``head_params``)."""
    choices: dict[str, Any] = {}
    for entry in config.tasks or []:
        if entry.head is not None:
            choices[entry.name] = {"name": entry.head, **entry.head_params}
    return choices


def init_run(config: RunConfig) -> Path | None:
    """The run folder (or local ``.safetensors`` weights file) that ``model.init`` names, or None when it
    names an initialisation scheme."""
    value = config.model.init
    if value == PRETRAINED or value in INIT_SCHEMES:
        return None
    path = Path(value).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if not path.is_dir():
        raise ConfigError(
            f"model.init={value!r} is neither an initialisation scheme ({', '.join(INIT_SCHEMES.names())}, "
            f"{PRETRAINED}), a run folder nor a local .safetensors file to start from: {path} is not a "
            "directory or a .safetensors file."
        )
    if not (path / WEIGHTS_NAME).is_file():
        raise ConfigError(f"model.init={value!r}: the run folder {path} holds no {WEIGHTS_NAME} to start from.")
    if (path / WEMOE_LAYOUT).is_file():
        raise ConfigError(
            f"model.init={value!r}: {path} is a WEMoE merge ({WEMOE_LAYOUT}): its residual blocks are routed mixtures "
            "of the experts' task vectors, not plain weights a model can start from; start from a merge by another "
            "rule (e.g. task_arithmetic)"
        )
    return path


def is_plain_start(run_dir: Path) -> bool:
    """Whether a run folder's weights are one plain set a model can start from (``model.init``): not a WEMoE
    merge (routed blocks) nor a task-specific one (EMR-merging), the two that ``model.init`` refuses."""
    weights = run_dir / WEIGHTS_NAME
    return weights.is_file() and not (run_dir / WEMOE_LAYOUT).is_file() and modulation_layout(weights) is None


def load_init_weights(model: MultiTaskModel, path: Path) -> dict[str, list[str]]:
    """Copy every tensor of the weights file ``path`` whose name (or backbone stage) and shape match into ``model``.

    Returns the names loaded, and those skipped because the file lacks them or their shape differs; a file
    that matches nothing is an error (it was saved from another backbone or architecture).
    """
    own = model.state_dict()
    saved = read_weights(path, like=own)
    if modulation_layout(path) is not None:
        raise ConfigError(
            f"model.init: {path} holds a task-specific merged backbone (EMR-merging: one per task), so there is no "
            "single set of weights to start from; merge with a rule that gives one (e.g. --rule ties) to train from it"
        )
    source = {k: k for k in own if k in saved}
    # Architectures place the backbone stages differently (HPS: architecture.backbone.stages.i, MTAN:
    # architecture.stages.i, cross-stitch: one copy per task); a stage tensor found exactly once in the
    # file under the same "stages.i..." suffix is taken for every copy of it in the model.
    by_stage: dict[str, list[str]] = {}
    for key in saved:
        if "stages." in key:
            by_stage.setdefault(key[key.rfind("stages.") :], []).append(key)
    for key in own:
        if key not in source and "stages." in key:
            candidates = by_stage.get(key[key.rfind("stages.") :], [])
            if len(candidates) == 1:
                source[key] = candidates[0]
    loaded = [k for k, v in own.items() if k in source and saved[source[k]].shape == v.shape]
    mis_shaped = [k for k, v in own.items() if k in source and saved[source[k]].shape != v.shape]
    absent = [k for k in own if k not in source]
    if not loaded:
        raise CheckpointError(
            f"model.init: no tensor of {path} matches this model by name and shape ({len(saved)} tensors in the "
            f"file, {len(own)} in the model; e.g. file {next(iter(saved), '-')!r}, model {next(iter(own), '-')!r}). "
            "Was it saved from another backbone or architecture?"
        )
    model.load_state_dict({k: saved[source[k]] for k in loaded}, strict=False)
    return {"loaded": loaded, "shape_differs": mis_shaped, "not_in_file": absent}


def _report_init(path: Path, result: dict[str, list[str]]) -> None:
    def parts(names: list[str]) -> str:
        groups: dict[str, int] = {}
        for name in names:
            prefix = ".".join(name.split(".")[:2])
            groups[prefix] = groups.get(prefix, 0) + 1
        return ", ".join(f"{g} ({n})" for g, n in groups.items())

    logger.info("model.init: loaded %d tensors from %s: %s", len(result["loaded"]), path, parts(result["loaded"]))
    for reason, label in (("shape_differs", "shapes differ"), ("not_in_file", "not in the file")):
        if result[reason]:
            logger.info("  kept initialised (%s): %s", label, parts(result[reason]))


def build_model(
    config: RunConfig, tasks: Sequence[Task], load_init: bool = True, layout: ModulationLayout | None = None
) -> MultiTaskModel:
    """The multi-task model of ``model.*`` for ``tasks``.

    When ``model.init`` names a run folder (or a ``.safetensors`` file), the model is initialised with kaiming
    and then takes every tensor of those weights whose name and shape match (with ``load_init``; loading a run's own
    weights afterwards needs no such start). With a ``layout`` the model is a :class:`TaskModulatedModel`
    (one backbone per task, as EMR-merging makes).
    """
    start = init_run(config)
    if start is not None:
        config = config.model_copy(update={"model": config.model.model_copy(update={"init": "kaiming"})})
    model = _build_model(config, tasks, layout)
    if start is not None and load_init:
        weights = start if start.is_file() else start / WEIGHTS_NAME
        _report_init(weights, load_init_weights(model, weights))
    return model


def _build_model(config: RunConfig, tasks: Sequence[Task], layout: ModulationLayout | None = None) -> MultiTaskModel:
    spec_cls = ARCHITECTURES.get(config.model.architecture_name)
    try:
        architecture = spec_cls(**config.model.architecture_params)
    except (TypeError, ValidationError) as exc:
        raise ConfigError(f"model.architecture {config.model.architecture_name!r}: {exc}") from None
    factory: Callable[..., MultiTaskModel] = (
        MultiTaskModel if layout is None else partial(TaskModulatedModel, layout=layout)
    )
    return factory(
        backbone=config.model.backbone,
        tasks=tasks,
        architecture=architecture,
        heads=head_choices(config),
        init=config.model.init,
        pretrained=config.model.pretrained,
        freeze_stages=config.model.freeze_stages,
    )


def build_balancer(config: RunConfig) -> Balancer:
    return get_balancer(config.balancer.name, **config.balancer.hparams)


class PreparedDataset(Dataset):
    """A dataset split restricted to the run's tasks, with the joint transform applied to each sample.

    Augmentation draws come from a generator seeded by (seed, epoch, index), so a sample's augmentation
    does not depend on which worker loads it or on where a resumed run restarted.
    """

    def __init__(
        self,
        base: Dataset,
        task_names: Sequence[str],
        transform: JointTransform | None,
        seed: int = 0,
        batches_from: Dataset | None = None,
    ) -> None:
        self.base = base
        self.task_names = list(task_names)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.batches_from = batches_from if batches_from is not None else base

    def batch_sampler(self, batch_size: int, **kwargs: Any) -> Sampler[list[int]] | None:
        """The training batches of a dataset that mixes several sources (None: the trainer shuffles)."""
        make = getattr(self.batches_from, "batch_sampler", None)
        return None if make is None else make(batch_size, **kwargs)

    @property
    def skipped(self) -> int | None:
        """Samples skipped as unreadable so far (``data.skip_bad``), or None when skipping is off."""
        return self.base.skipped if isinstance(self.base, SkipBadSamples) else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]  # map-style datasets define __len__

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.base[index]
        sample = {
            **sample,
            "targets": {n: sample["targets"][n] for n in self.task_names},
            "valid": {n: sample["valid"][n] for n in self.task_names},
        }
        if self.transform is None:
            return sample
        self.transform.generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        )
        return self.transform(sample)


def build_split(config: RunConfig, tasks: Sequence[Task], split: str, train: bool) -> PreparedDataset:
    """One split of the configured dataset, with training augmentation when ``train``.

    Every label is checked by its task as it is read (a bad one raises DataError naming the sample); with
    ``data.skip_bad`` unreadable or refused samples are skipped and counted instead.
    """
    base = open_split(config, split)
    checked = guard_split(base, {t.name: t for t in tasks}, split, config.data.skip_bad)
    transform = build_transforms(config.data.augment, target_specs(tasks), train=train)
    return PreparedDataset(checked, [t.name for t in tasks], transform, seed=config.seed, batches_from=base)


def open_split(config: RunConfig, split: str) -> Dataset:
    """The configured dataset's ``split`` as stored (no checks, no transform); running out of memory while
    building it is a DataError naming the largest data setting."""
    source, params = dataset_source(config)
    try:
        return source.build(params, split)
    except MemoryError:
        raise DataError(_too_large(config, split)) from None


def _too_large(config: RunConfig, split: str) -> str:
    sizes = sorted(
        (
            (value, key)
            for key, value in config.data.dataset_params.items()
            if isinstance(value, int) and not isinstance(value, bool)
        ),
        reverse=True,
    )
    hint = f"; the largest number among the data settings is data.{sizes[0][1]}={sizes[0][0]}" if sizes else ""
    return f"not enough memory to build the {split} split of dataset {config.data.name!r}{hint}: lower it"


def with_absolute_init(config: RunConfig) -> RunConfig:
    """``model.init`` as an absolute path when it names a run folder or weights file, so config.yaml says which."""
    path = Path(config.model.init).expanduser()
    if not (path.is_dir() or (path.is_file() and path.suffix == ".safetensors")):
        return config
    return config.model_copy(update={"model": config.model.model_copy(update={"init": str(path.resolve())})})


def with_task_list(config: RunConfig, tasks: Sequence[Task]) -> RunConfig:
    """The config with the task list written out (so config.yaml says exactly what ran)."""
    if config.tasks is not None:
        return config
    return config.model_copy(update={"tasks": [TaskEntry(name=t.name) for t in tasks]})


def image_size(config: RunConfig) -> tuple[int, int] | None:
    """The model's input size: ``data.augment.resize``, else ``data.image_size``, or None for datasets of
    varying size."""
    size = config.data.augment.get("resize") or getattr(dataset_source(config)[1], "image_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_model(run: str | Path | Run) -> tuple[MultiTaskModel, RunConfig]:
    """The trained model of a run folder (best weights, in eval mode) and its config; a
    :class:`TaskModulatedModel` when its weights record a task modulation (EMR-merging)."""
    run = run if isinstance(run, Run) else Run.load(run)
    path = run.path / WEIGHTS_NAME
    layout = modulation_layout(path) if path.is_file() else None
    model = build_model(run.config, build_tasks(run.config), load_init=False, layout=layout)
    rebuild_wemoe(model, run.path)  # a WEMoE merge's upscaled blocks (nothing for any other run)
    load_weights(model, path)
    return model.eval(), run.config
