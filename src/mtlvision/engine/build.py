"""From a validated :class:`~mtlvision.config.RunConfig` to tasks, datasets, model, balancer and trainer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch.utils.data import Dataset

from mtlvision.balancers import Balancer, get as get_balancer
from mtlvision.config import RunConfig, TaskEntry
from mtlvision.data.datasets import DATASETS, DatasetParams, DatasetSource, TaskSpec
from mtlvision.data.transforms import JointTransform, build_transforms, target_specs
from mtlvision.engine.trainer import Trainer
from mtlvision.errors import ConfigError
from mtlvision.models import MultiTaskModel
from mtlvision.models.architectures import ARCHITECTURES
from mtlvision.tasks import TASKS, Task


def dataset_source(config: RunConfig) -> tuple[type[DatasetSource], DatasetParams]:
    """The registered dataset and its validated parameters (errors name the ``data.*`` key)."""
    source = DATASETS.get(config.data.name)
    try:
        params = source.Params.model_validate(config.data.dataset_params)
    except ValidationError as exc:
        problems = "; ".join(
            f"data.{'.'.join(str(p) for p in e['loc'])}: "
            + ("unknown key for this dataset" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise ConfigError(f"Invalid dataset parameters for {config.data.name!r}: {problems}") from None
    return source, params


def build_tasks(config: RunConfig) -> list[Task]:
    """The run's tasks: those named in ``tasks`` (all the dataset's tasks when omitted), in that order."""
    source, params = dataset_source(config)
    available: dict[str, TaskSpec] = source.tasks(params)
    entries = config.tasks if config.tasks is not None else [TaskEntry(name=n) for n in available]
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


def build_model(config: RunConfig, tasks: Sequence[Task]) -> MultiTaskModel:
    """The multi-task model of ``model.*`` for ``tasks``."""
    spec_cls = ARCHITECTURES.get(config.model.architecture_name)
    try:
        architecture = spec_cls(**config.model.architecture_params)
    except (TypeError, ValidationError) as exc:
        raise ConfigError(f"model.architecture {config.model.architecture_name!r}: {exc}") from None
    return MultiTaskModel(
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
        self, base: Dataset, task_names: Sequence[str], transform: JointTransform | None, seed: int = 0
    ) -> None:
        self.base = base
        self.task_names = list(task_names)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

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
    """One split of the configured dataset, with training augmentation when ``train``."""
    source, params = dataset_source(config)
    base = source.build(params, split)
    transform = build_transforms(config.data.augment, target_specs(tasks), train=train)
    return PreparedDataset(base, [t.name for t in tasks], transform, seed=config.seed)


def build_trainer(config: RunConfig, model: MultiTaskModel, run_dir: Path | None) -> Trainer:
    """A trainer with every ``train.*`` and ``balancer.*`` setting of ``config``."""
    train = config.train
    return Trainer(
        model,
        build_balancer(config),
        epochs=train.epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        optimizer=train.optimizer,
        weight_decay=train.weight_decay,
        momentum=train.momentum,
        scheduler=train.scheduler,
        step_size=train.step_size,
        gamma=train.gamma,
        warmup_epochs=train.warmup_epochs,
        grad_clip=train.grad_clip,
        device=train.device,
        early_stopping=train.early_stopping,
        select=train.select,
        balancer_mode=config.balancer.mode,
        jacobian=config.balancer.jacobian,
        backbone_lr_scale=config.model.backbone_lr_scale,
        num_workers=config.data.num_workers,
        seed=config.seed,
        deterministic=train.deterministic,
        precision=train.precision,
        accumulate=train.accumulate,
        ema=train.ema,
        compile=train.compile,
        checkpoint_every=train.checkpoint_every,
        max_nonfinite=train.max_nonfinite,
        run_dir=run_dir,
        progress=train.progress,
    )
