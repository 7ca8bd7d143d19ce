"""One run from start to report: build → fit → evaluate → report, and the jobs made of runs.

:class:`TrainingRun` owns the sequence of ``mtlvision train``: it builds the tasks, the data and the model
from a validated :class:`~mtlvision.config.RunConfig`, makes the run folder (only once everything that can
be wrong in the configuration has been found, so a failed start leaves no folder), trains with a
:class:`~mtlvision.engine.trainer.Trainer` built from the config, evaluates the best weights and writes
the :class:`~mtlvision.engine.runs.RunReport`. :func:`train_experts` (``baseline``) and :func:`evaluate_run`
(``eval``) are sequences of the same steps. The module is longer than the usual 400 lines because resuming (which
keys may change, a finished run left as it is) belongs to the same sequence.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from mtlvision.config import RunConfig, TaskEntry, apply_overrides, validate
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
from mtlvision.engine.logging import EpochSummary
from mtlvision.engine.loop_state import needs_validation, parse_mean_last
from mtlvision.engine.probes import StepProbe
from mtlvision.engine.run_lock import run_folder_lock
from mtlvision.engine.runs import (
    BASELINES_NAME,
    CHECKPOINT_NAME,
    INIT_WEIGHTS_NAME,
    LOCK_NAME,
    METRICS_NAME,
    PLOTS_DIR,
    WEIGHTS_NAME,
    Baselines,
    Metrics,
    Run,
    RunReport,
    delta_m_against,
    directions,
    new_run_dir,
    read_config,
    training_compute,
    write_config,
)
from mtlvision.engine.trainer import FitResult, Trainer
from mtlvision.errors import ConfigError, DataError, MtlvisionError
from mtlvision.evaluation.delta_m import delta_m
from mtlvision.evaluation.evaluator import evaluate as evaluate_model
from mtlvision.evaluation.plots import plot_history
from mtlvision.models import MultiTaskModel
from mtlvision.models.complexity import model_complexity
from mtlvision.run_settings import RESUME_KEYS, differences, flatten, with_resume_overrides

logger = logging.getLogger(__name__)


def input_size(config: RunConfig, data: PreparedDataset) -> tuple[int, int]:
    """The model's input size for reports (parameters, FLOPs): the configured one, else the first sample's."""
    size = image_size(config)
    if size is not None:
        return size
    height, width = data[0]["image"].shape[-2:]
    return int(height), int(width)


def skipped_counts(config: RunConfig, counts: Mapping[str, int | None]) -> dict[str, int] | None:
    """Samples skipped per split under ``data.skip_bad`` (None when skipping is off)."""
    if not config.data.skip_bad:
        return None
    return {split: int(count) for split, count in counts.items() if count is not None}


#: what a run needs before it writes anything: the model, its trainer, the train and val splits
Prepared = tuple[MultiTaskModel, Trainer, PreparedDataset, PreparedDataset | None]


class TrainingRun:
    """The owner of one training run's sequence (``mtlvision train``); :meth:`execute` returns the :class:`Run`.

    ``resume`` continues a run folder from its checkpoint with the folder's own config, changed only by the
    ``overrides`` that :func:`~mtlvision.run_settings.with_resume_overrides` accepts (``train.epochs`` to
    extend a run, ...); a finished run is left as it is unless its epochs are extended. ``save_init`` also
    stores the initial weights as ``init.safetensors`` (the base of task arithmetic). ``probes`` join the
    trainer's (:mod:`mtlvision.engine.probes`; the affinity run's). ``on_epoch`` is called with each epoch's
    summary (Δm on val filled in) after it is logged: a tuning study prunes a trial there.

    A new run folder is made only once everything that can be wrong in the configuration has been found, and
    removed again when training fails before its first checkpoint: a failed start leaves nothing behind.
    While training, the run holds the folder's lock (:func:`~mtlvision.engine.run_lock.run_folder_lock`).
    """

    def __init__(
        self,
        config: RunConfig | None = None,
        *,
        out: str | Path = "runs",
        name: str | None = None,
        resume: str | Path | None = None,
        overrides: Mapping[str, Any] | Sequence[str] | None = None,
        save_init: bool = False,
        probes: Sequence[StepProbe] = (),
        on_epoch: Callable[[EpochSummary], None] | None = None,
    ) -> None:
        self.extends = False
        self.on_epoch = on_epoch
        if resume is not None:
            self.resumed: Path | None = Path(resume)
            stored = read_config(self.resumed)
            config = with_resume_overrides(stored, overrides)
            self.extends = config.train.epochs > stored.train.epochs
        elif config is None:
            raise MtlvisionError("a training run needs a configuration or a run folder to resume")
        elif overrides:
            raise MtlvisionError("overrides of a new run belong in its configuration (mtlvision.config)")
        else:
            self.resumed = None
            config = with_absolute_init(config)
        self.tasks = build_tasks(config)
        self.config = with_task_list(config, self.tasks)
        self.out, self.name, self.save_init = Path(out), name, save_init
        self.probes = list(probes)
        self._experts: Baselines | None = None

    def execute(self) -> Run:
        """Build, train, evaluate and report; the run folder holds everything when this returns."""
        if self.resumed is None:
            return self._start()
        with self._lock(self.resumed):
            finished = self._finished(self.resumed)
            if finished is not None:
                return finished
            return self._train(self.resumed)

    def _start(self) -> Run:
        prepared = self._prepare()
        run_dir = self._make_folder()
        try:
            with self._lock(run_dir):
                return self._train(run_dir, prepared)
        except BaseException:
            if dist.is_main() and not any((run_dir / name).exists() for name in (CHECKPOINT_NAME, METRICS_NAME)):
                shutil.rmtree(run_dir, ignore_errors=True)  # a failed start leaves no folder behind
            raise

    @staticmethod
    def _lock(run_dir: Path) -> AbstractContextManager[None]:
        return run_folder_lock(run_dir) if dist.is_main() else nullcontext()

    def _finished(self, run_dir: Path) -> Run | None:
        """The run as it is when it finished and its epochs are not extended; an error when it cannot go on."""
        has_checkpoint = (run_dir / CHECKPOINT_NAME).is_file()
        if not (run_dir / METRICS_NAME).is_file():
            if not has_checkpoint:
                raise MtlvisionError(f"cannot resume {run_dir}: it holds no {CHECKPOINT_NAME}")
            return None
        if not self.extends:
            logger.info(
                "%s has finished (%d epochs); nothing to resume and nothing changed. To train it longer, resume "
                "with --set train.epochs=N.",
                run_dir,
                self.config.train.epochs,
            )
            return Run.load(run_dir)
        if not has_checkpoint:
            raise MtlvisionError(
                f"cannot extend {run_dir}: it finished and its {CHECKPOINT_NAME} was removed (train.keep_checkpoint="
                "false). Start a new run from its weights (--set model.init=RUN), or keep checkpoints of runs you "
                "may extend with train.keep_checkpoint=true"
            )
        return None

    def _prepare(self) -> Prepared:
        """Data, model and trainer, before anything is written."""
        config, tasks = self.config, self.tasks
        check_before_training(config)  # data.check: leaks between splits, paths, CSV labels; no image decoded
        train_data = build_split(config, tasks, "train", train=True)
        val_data = self._validation_split()
        seed_everything(config.seed)  # the initial weights depend on the seed alone (experts share their init)
        model = build_model(config, tasks, load_init=self.resumed is None)
        auxiliary = None
        if config.distill.experts:
            from mtlvision.engine.distill import build_distillation

            auxiliary = build_distillation(config, tasks, model)
        trainer = Trainer.from_config(config, model, auxiliary=auxiliary, probes=self.probes)
        trainer.on_epoch_end = self._epoch_end
        return model, trainer, train_data, val_data

    def _validation_split(self) -> PreparedDataset | None:
        """The val split; empty or missing it is an error, unless ``train.select`` (``last``, ``mean_last:N``)
        needs none."""
        config, last = self.config, not needs_validation(self.config.train.select)
        select = config.train.select
        try:
            data = build_split(config, self.tasks, "val", train=False)
        except DataError as exc:
            if not last:
                raise
            logger.info("No validation split (%s); the last epoch is kept (train.select=%s).", exc, select)
            return None
        if len(data) > 0:
            return data
        if last:
            logger.info("The validation split is empty; the last epoch is kept (train.select=%s).", select)
            return None
        raise DataError(
            f"the val split of dataset {config.data.name!r} is empty: validation chooses the epoch whose weights "
            "are kept. Give the dataset validation samples, or set train.select=last to keep the last epoch."
        )

    def _train(self, run_dir: Path, prepared: Prepared | None = None) -> Run:
        config, resumed = self.config, self.resumed is not None
        model, trainer, train_data, val_data = prepared or self._prepare()
        trainer.run_dir = run_dir
        if dist.is_main():
            write_config(run_dir, config)
            if self.save_init and not resumed:
                save_weights(model, run_dir / INIT_WEIGHTS_NAME)
        logger.info("Run folder: %s — tasks: %s", run_dir, ", ".join(t.name for t in self.tasks))
        self._experts = self._val_experts(run_dir)
        if trainer.selection.by_delta_m:
            trainer.selection.baselines = self._selection_baselines(run_dir)
        eval_data = None
        if trainer.selection.average_last is not None:
            eval_data = build_split(config, self.tasks, config.train.eval_split, train=False)
        fit = trainer.fit(train_data, val_data, resume=resumed, eval_data=eval_data)
        report = self._report(run_dir, model, trainer, fit, train_data, val_data is not None)
        if dist.is_main() and not config.train.keep_checkpoint:
            (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)  # a finished run keeps what inference needs
        run = Run(path=run_dir, config=config, report=report)
        if resumed and dist.is_main():
            record_expert(run)
        return run

    def _make_folder(self) -> Path:
        # under torchrun rank 0 makes the folder and every rank uses it
        made = str(new_run_dir(self.out, self.name or self.config.data.name)) if dist.is_main() else None
        return Path(str(dist.broadcast_object(made)))

    # ------------------------------------------------------------------------------------- epoch-end table
    def _val_experts(self, run_dir: Path) -> Baselines | None:
        """The experts whose validation metrics give Δm at every epoch end, when there are such."""
        path = Baselines.for_run(run_dir, self.config)
        if not path.is_file():
            return None
        try:
            experts = Baselines.load(path)
            experts.metrics((t.name for t in self.tasks), "val")
        except MtlvisionError:
            return None
        return None if experts.data_differences(self.config.data.dataset_params) else experts

    def _selection_baselines(self, run_dir: Path) -> Metrics:
        """The experts' validation metrics that ``train.select=delta_m`` scores epochs against."""
        path = Baselines.for_run(run_dir, self.config)
        if not path.is_file():
            raise ConfigError(
                f"train.select=delta_m chooses the epoch by validation Δm against single-task experts, and there "
                f"are none at {path}: run `mtlvision baseline` first (or set `baselines:` to their "
                "baselines.json), or choose another train.select."
            )
        return Baselines.load(path).metrics((t.name for t in self.tasks), "val")

    def _val_delta_m(self, metrics: Metrics) -> float | None:
        if self._experts is None or not metrics:
            return None
        experts = self._experts.metrics((t.name for t in self.tasks), "val")
        return delta_m(metrics, experts, directions(self.tasks)).overall

    def _epoch_end(self, summary: EpochSummary) -> None:
        """Δm on val against the experts added; logged as one line with the summary attached (the CLI draws
        it as a table)."""
        summary.delta_m = self._val_delta_m(summary.metrics)
        summary.best_delta_m = self._val_delta_m(summary.best_metrics)
        logger.info("%s", summary.line(), extra={"epoch_summary": summary})
        if self.on_epoch is not None:
            self.on_epoch(summary)

    # ------------------------------------------------------------------------------------------- report
    def _report(
        self,
        run_dir: Path,
        model: MultiTaskModel,
        trainer: Trainer,
        fit: FitResult,
        train_data: PreparedDataset,
        validated: bool,
    ) -> RunReport:
        """Evaluate the best weights on val and the eval split; write metrics.json and the plots."""
        config, tasks = self.config, self.tasks
        load_weights(model, run_dir / WEIGHTS_NAME)
        metrics: dict[str, Metrics] = {}
        skipped: dict[str, int | None] = {"train": train_data.skipped}
        data: PreparedDataset = train_data
        for split in dict.fromkeys(["val", config.train.eval_split] if validated else [config.train.eval_split]):
            data = build_split(config, tasks, split, train=False)
            metrics[split] = evaluate_model(
                model, trainer.loader(data, shuffle=False), trainer.tasks, trainer.device
            ).metrics
            skipped[split] = data.skipped
        split = config.train.eval_split
        if trainer.selection.average_last is not None:
            metrics[split] = trainer.selection.averaged(trainer.state.history)
        size = input_size(config, data)
        state = trainer.state
        compute = training_compute(state.epoch, state.step, len(train_data), config.train.batch_size)
        report = RunReport(
            split=split,
            metrics=metrics[split],
            val_metrics=metrics.get("val"),
            best_epoch=fit.best_epoch,
            selection=selection_text(config.train.select, validated),
            model=model_complexity(model, image_size=size),
            skipped_samples=skipped_counts(config, skipped),
            compute=compute,
            **delta_m_against(Baselines.for_run(run_dir, config), config, tasks, metrics[split], split, compute),
        )
        if dist.is_main():
            report.save(run_dir)
            plot_history(trainer.state.history, run_dir / PLOTS_DIR)
            for probe in trainer.probes:
                probe.plot(run_dir / PLOTS_DIR)
        return report


def selection_text(select: str, validated: bool) -> str:
    """How the kept epoch was chosen, as metrics.json says it."""
    if select == "last":
        return "the last epoch (train.select=last" + ("" if validated else "; no validation split") + ")"
    count = parse_mean_last(select)
    if count is not None:
        return (
            f"the last epoch's weights; metrics are the mean of the eval split's metrics over the last {count} "
            f"epochs (train.select={select}, the Nash-MTL / FAMO protocol)"
        )
    if select == "delta_m":
        return "the epoch with the best validation Δm against the single-task experts (train.select=delta_m)"
    if select == "delta_m_first":
        return (
            "the epoch with the best gain of its validation metrics over the first epoch's, tasks weighted equally "
            "(train.select=delta_m_first, LibMTL's rule)"
        )
    what = "validation loss" if select == "loss" else f"validation {select}"
    return f"the epoch with the best {what} (train.select={select})"


def record_expert(run: Run) -> None:
    """Add a single-task run that sits in a folder of experts (``baseline``) to that folder's baselines.json."""
    path = run.path.parent / BASELINES_NAME
    tasks = run.config.tasks or []
    if not path.is_file() or len(tasks) != 1 or tasks[0].name != run.path.name:
        return
    baselines = Baselines.load(path)
    if baselines.data_differences(run.config.data.dataset_params):
        return
    baselines.record(tasks[0].name, run)
    baselines.save()
    logger.info("Expert %s recorded in %s.", tasks[0].name, path)


def train_experts(config: RunConfig, *, out: str | Path = "runs", name: str | None = None) -> Baselines:
    """One single-task expert per task (``mtlvision baseline``), their metrics stored in ``baselines.json``.

    Run again after an interruption, it continues: experts already in baselines.json are kept, interrupted
    ones resume from their checkpoints, the others are trained.
    """
    tasks = build_tasks(config)
    folder = Path(out) / name if name else Baselines.default_path(out, config).parent
    folder.mkdir(parents=True, exist_ok=True)
    baselines = Baselines.open(folder / BASELINES_NAME, config.data.dataset_params)
    baselines.save()  # from the start, so that `train --resume` of an interrupted expert records it here
    entries = config.tasks or [TaskEntry(name=t.name) for t in tasks]
    for task in tasks:
        expert = config.model_copy(update={"tasks": [e for e in entries if e.name == task.name]})
        run = _expert(expert, folder / task.name, baselines)
        if run is not None:
            baselines.record(task.name, run)
            baselines.save()
    return baselines


def matched_expert_config(run: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The configuration of experts on the same budget per task as the joint ``run`` (``baseline --match RUN``).

    It is the run's own config.yaml (its data, model, epochs, batch size, optimiser, schedule, seed: every
    expert sees the same images the same number of times as each task of the run) with equal weighting (a
    balancer of one task has nothing to balance) and without the run's ``baselines``; ``overrides`` apply on top.
    """
    stored = read_config(Path(run)).to_dict()
    stored["balancer"], stored["baselines"] = {"name": "ew"}, None
    return validate(apply_overrides(stored, dict(overrides or {})))


def _expert(config: RunConfig, run_dir: Path, baselines: Baselines) -> Run | None:
    """The finished expert ``run_dir`` (None when baselines.json holds it already): kept, resumed or trained."""
    task = run_dir.name
    if task in baselines.experts:
        differing = baselines.settings_warning(config, [task])
        logger.info("Expert %s: kept from %s.", task, baselines.path)
        if differing:
            logger.warning(
                "Expert %s was trained with other settings: %s; to retrain it, use another --name.", task, differing
            )
        return None
    if (run_dir / METRICS_NAME).is_file():
        logger.info("Expert %s: finished in %s; recorded.", task, run_dir)
        return Run.load(run_dir)
    if (run_dir / CHECKPOINT_NAME).is_file():
        logger.info("Expert %s: resuming %s from its checkpoint.", task, run_dir)
        return TrainingRun(resume=run_dir, overrides=_resume_changes(config, run_dir)).execute()
    if run_dir.exists():  # killed before its first checkpoint: nothing to keep
        with run_folder_lock(run_dir):
            logger.info("Expert %s: %s holds no checkpoint; training it again.", task, run_dir)
            for item in run_dir.iterdir():
                if item.name != LOCK_NAME:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        run_dir.rmdir()
    return TrainingRun(config, out=run_dir.parent, name=task, save_init=True).execute()


def _resume_changes(config: RunConfig, run_dir: Path) -> dict[str, Any]:
    """The settings asked now that differ from those an interrupted expert was started with."""
    asked = flatten(with_task_list(with_absolute_init(config), build_tasks(config)).to_dict())
    stored = flatten(read_config(run_dir).to_dict())
    changed = {k: asked.get(k) for k in dict.fromkeys([*asked, *stored]) if asked.get(k) != stored.get(k)}
    refused = [k for k in changed if k not in RESUME_KEYS]
    if refused:
        raise MtlvisionError(
            f"the interrupted expert {run_dir} was started with other settings ("
            + ", ".join(differences(stored, asked, ("then", "now")))
            + "); run `baseline` with those settings "
            "to finish it, remove the folder to train it again, or choose another --name"
        )
    return changed


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
    # experts given explicitly (their folder or file) must exist; only the default may be absent (no Δm then)
    path = Baselines.locate(baselines) if baselines else Baselines.for_run(run.path, config)
    compute = run.report.compute if run.report is not None else None  # the budget it was trained with
    return RunReport(
        split=split,
        metrics=metrics,
        skipped_samples=skipped_counts(config, {split: data.skipped}),
        compute=compute,
        **delta_m_against(path, config, model.tasks.values(), metrics, split, compute),
    )
