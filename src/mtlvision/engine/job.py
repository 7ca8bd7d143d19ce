"""One run from start to report: build → fit → evaluate → report, and the jobs made of runs.

:class:`TrainingRun` owns the sequence of ``mtlvision train``: it builds the tasks, the data and the model
from a validated :class:`~mtlvision.config.RunConfig`, makes the run folder (only once everything that can
be wrong in the configuration has been found, so a failed start leaves no folder), trains with a
:class:`~mtlvision.engine.trainer.Trainer` built from the config, evaluates the best weights and writes
the :class:`~mtlvision.engine.runs.RunReport`. :func:`train_experts` (``baseline``) and :func:`evaluate_run`
(``eval``) are sequences of the same steps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch.utils.data import DataLoader

from mtlvision.config import RunConfig, TaskEntry
from mtlvision.data.collate import Collate
from mtlvision.engine import distributed as dist
from mtlvision.engine.build import (
    PreparedDataset,
    build_model,
    build_split,
    build_tasks,
    image_size,
    load_model,
    with_absolute_init,
    with_task_list,
)
from mtlvision.engine.checkpoint import load_weights, save_weights
from mtlvision.engine.device import resolve_device, seed_everything
from mtlvision.engine.inputs import check_before_training
from mtlvision.engine.runs import (
    BASELINES_NAME,
    CHECKPOINT_NAME,
    INIT_WEIGHTS_NAME,
    PLOTS_DIR,
    WEIGHTS_NAME,
    Baselines,
    Metrics,
    Run,
    RunReport,
    delta_m_against,
    new_run_dir,
    read_config,
    write_config,
)
from mtlvision.engine.trainer import FitResult, Trainer
from mtlvision.errors import MtlvisionError
from mtlvision.evaluation.evaluator import evaluate as evaluate_model
from mtlvision.evaluation.plots import plot_history
from mtlvision.models import MultiTaskModel
from mtlvision.models.complexity import model_complexity

logger = logging.getLogger(__name__)


def skipped_counts(config: RunConfig, counts: Mapping[str, int | None]) -> dict[str, int] | None:
    """Samples skipped per split under ``data.skip_bad`` (None when skipping is off)."""
    if not config.data.skip_bad:
        return None
    return {split: int(count) for split, count in counts.items() if count is not None}


class TrainingRun:
    """The owner of one training run's sequence (``mtlvision train``); :meth:`execute` returns the :class:`Run`.

    ``resume`` continues a run folder from its checkpoint with the folder's own config; ``save_init`` also
    stores the initial weights as ``init.safetensors`` (the base of task arithmetic).
    """

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        out: str | Path = "runs",
        name: str | None = None,
        resume: str | Path | None = None,
        save_init: bool = False,
    ) -> None:
        if resume is not None:
            self.resumed: Path | None = Path(resume)
            if not (self.resumed / CHECKPOINT_NAME).is_file():
                raise MtlvisionError(f"cannot resume {self.resumed}: it holds no {CHECKPOINT_NAME}")
            config = read_config(self.resumed)
        elif config is None:
            raise MtlvisionError("a training run needs a configuration or a run folder to resume")
        else:
            self.resumed = None
            config = with_absolute_init(config)
        self.tasks = build_tasks(config)
        self.config = with_task_list(config, self.tasks)
        self.out, self.name, self.save_init = Path(out), name, save_init

    def execute(self) -> Run:
        """Build, train, evaluate and report; the run folder holds everything when this returns."""
        config, tasks = self.config, self.tasks
        check_before_training(config)  # data.check: leaks between splits, paths, CSV labels; no image decoded
        train_data = build_split(config, tasks, "train", train=True)
        val_data = build_split(config, tasks, "val", train=False)
        seed_everything(config.seed)  # the initial weights depend on the seed alone (experts share their init)
        model = build_model(config, tasks, load_init=self.resumed is None)
        auxiliary = None
        if config.distill.experts:
            from mtlvision.engine.distill import build_distillation

            auxiliary = build_distillation(config, tasks, model)
        trainer = Trainer.from_config(config, model, auxiliary=auxiliary)
        run_dir = self.resumed or self._make_folder()
        trainer.run_dir = run_dir
        if dist.is_main():
            write_config(run_dir, config)
            if self.save_init and self.resumed is None:
                save_weights(model, run_dir / INIT_WEIGHTS_NAME)
        logger.info("Run folder: %s — tasks: %s", run_dir, ", ".join(t.name for t in tasks))
        fit = trainer.fit(train_data, val_data, resume=self.resumed is not None)
        return Run(path=run_dir, config=config, report=self._report(run_dir, model, trainer, fit, train_data))

    def _make_folder(self) -> Path:
        # under torchrun rank 0 makes the folder and every rank uses it
        made = str(new_run_dir(self.out, self.name or self.config.data.name)) if dist.is_main() else None
        return Path(str(dist.broadcast_object(made)))

    def _report(
        self, run_dir: Path, model: MultiTaskModel, trainer: Trainer, fit: FitResult, train_data: PreparedDataset
    ) -> RunReport:
        """Evaluate the best weights on val and the eval split; write metrics.json and the plots."""
        config, tasks = self.config, self.tasks
        load_weights(model, run_dir / WEIGHTS_NAME)
        metrics: dict[str, Metrics] = {}
        skipped: dict[str, int | None] = {"train": train_data.skipped}
        for split in dict.fromkeys(["val", config.train.eval_split]):
            data = build_split(config, tasks, split, train=False)
            metrics[split] = evaluate_model(
                model, trainer.loader(data, shuffle=False), trainer.tasks, trainer.device
            ).metrics
            skipped[split] = data.skipped
        split = config.train.eval_split
        size = image_size(config) or tuple(data[0]["image"].shape[-2:])
        delta, note = delta_m_against(Baselines.for_run(run_dir, config), config, tasks, metrics[split], split)
        report = RunReport(
            split=split, metrics=metrics[split], val_metrics=metrics["val"], best_epoch=fit.best_epoch,
            model=model_complexity(model, image_size=size), skipped_samples=skipped_counts(config, skipped),
            delta_m=delta, delta_m_note=note,
        )
        if dist.is_main():
            report.save(run_dir)
            plot_history(trainer.state.history, run_dir / PLOTS_DIR)
        return report


def train_experts(config: RunConfig, *, out: str | Path = "runs", name: str | None = None) -> Baselines:
    """One single-task expert per task (``mtlvision baseline``), their metrics stored in ``baselines.json``."""
    tasks = build_tasks(config)
    folder = new_run_dir(out, name) if name else Baselines.default_path(out, config).parent
    folder.mkdir(parents=True, exist_ok=True)
    baselines = Baselines.open(folder / BASELINES_NAME, config.data.dataset_params)
    entries = config.tasks or [TaskEntry(name=t.name) for t in tasks]
    for task in tasks:
        logger.info("single-task expert: %s", task.name)
        expert = config.model_copy(update={"tasks": [e for e in entries if e.name == task.name]})
        run = TrainingRun(expert, out=folder, name=task.name, save_init=True).execute()
        baselines.record(task.name, run)
        baselines.save()
    return baselines


def evaluation_loader(config: RunConfig, model: MultiTaskModel, split: str) -> tuple[DataLoader, PreparedDataset]:
    """A loader over one split of the run's data as evaluation reads it (no augmentation, in order)."""
    data = build_split(config, list(model.tasks.values()), split, train=False)
    return DataLoader(data, batch_size=config.train.batch_size, collate_fn=Collate(model.tasks)), data


def evaluate_splits(config: RunConfig, model: MultiTaskModel, splits: Sequence[str]) -> dict[str, Metrics]:
    """The model's metrics on each of ``splits`` of the config's data."""
    device = resolve_device(config.train.device)
    model.to(device)
    return {
        split: evaluate_model(model, evaluation_loader(config, model, split)[0], model.tasks, device).metrics
        for split in dict.fromkeys(splits)
    }


def evaluate_run(run: str | Path | Run, split: str | None = None, baselines: str | Path | None = None) -> RunReport:
    """A run's best weights evaluated on ``split`` (default: its eval split), with Δm when experts exist."""
    run = run if isinstance(run, Run) else Run.load(run)
    config = run.config
    split = split or config.train.eval_split
    model, _ = load_model(run)
    loader, data = evaluation_loader(config, model, split)
    device = resolve_device(config.train.device)
    metrics = evaluate_model(model.to(device), loader, model.tasks, device).metrics
    path = Path(baselines) if baselines else Baselines.for_run(run.path, config)
    delta, note = delta_m_against(path, config, model.tasks.values(), metrics, split)
    return RunReport(
        split=split, metrics=metrics, delta_m=delta, delta_m_note=note,
        skipped_samples=skipped_counts(config, {split: data.skipped}),
    )
