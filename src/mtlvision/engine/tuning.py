"""``mtlvision tune``: an Optuna study whose every trial is a normal training run.

The study folder (``OUT/NAME``) holds ``study.db`` (the default SQLite storage: kill ``tune`` and run it again,
the study continues), ``baseline/`` (the single-task experts that ``delta_m`` and ``pareto`` need, trained
once with the base configuration, or those given), ``trials/trial-NNNN`` (one run folder per trial, trained by
:class:`~mtlvision.engine.job.TrainingRun`), and once the trials are done ``trials.csv``, ``best.yaml`` (a
configuration ``mtlvision train`` accepts), ``importances.json`` and ``plots/``.

Every objective is measured on the validation split (the test split is left for the report). ``delta_m`` is
Δm against the experts (minimised; TPE, Bergstra et al. 2011; pruned by the median rule on each epoch's
validation Δm); ``TASK.METRIC`` that metric in its own direction; ``pareto`` one objective per task, each
task's Δm against its expert, searched with NSGA-II (Deb et al. 2002) and never pruned. A trial that diverges
is recorded as pruned, one that fails as failed, each with its ``reason``; the study goes on. Ctrl-C or SIGTERM
stops the study after recording the interrupted trial as failed (``interrupted``; it does not count toward
``--trials``), and writes the outputs so far; run ``tune`` again to continue.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mtlvision.config import RunConfig, apply_overrides, validate
from mtlvision.engine.build import build_tasks
from mtlvision.engine.job import TrainingRun, train_experts
from mtlvision.engine.logging import EpochSummary
from mtlvision.engine.loop_state import NonFiniteLossError, TrainingInterrupted
from mtlvision.engine.runs import BASELINES_NAME, Baselines, directions
from mtlvision.engine.search_space import SearchSpace
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.evaluation.delta_m import delta_m
from mtlvision.run_settings import flatten
from mtlvision.tasks import Task

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

STORAGE_NAME = "study.db"
TRIALS_DIR = "trials"
BEST_NAME = "best.yaml"
TABLE_NAME = "trials.csv"
IMPORTANCES_NAME = "importances.json"
#: settings each worker of a study may choose for itself (where it runs), left out of the study's check
_WORKER_KEYS = ("train.device", "train.progress", "data.num_workers")


def require_optuna() -> Any:
    """The optuna module (its own logging quietened to warnings), or an error naming the extra to install."""
    try:
        import optuna
    except ImportError:
        raise MtlvisionError("tuning needs Optuna: pip install 'mtlvision[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ---------------------------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class Objective:
    """What a trial is scored on: ``names`` and ``directions`` (``minimize``/``maximize``), one per value."""

    spec: str
    names: tuple[str, ...]
    directions: tuple[str, ...]
    tasks: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str, tasks: list[Task]) -> Objective:
        """``delta_m``, ``pareto`` or ``TASK.METRIC`` of the run's tasks; anything else is a clear error."""
        names = tuple(t.name for t in tasks)
        if spec == "delta_m":
            return cls(spec, ("delta_m",), ("minimize",), names)
        if spec == "pareto":
            if len(tasks) < 2:
                raise ConfigError("--objective pareto needs at least two tasks (one objective per task)")
            return cls(spec, tuple(f"delta_m.{n}" for n in names), ("minimize",) * len(names), names)
        task, _, metric = spec.partition(".")
        by_name = {t.name: t for t in tasks}
        if task not in by_name or metric not in by_name[task].metric_directions:
            choices = [f"{t.name}.{m}" for t in tasks for m in t.metric_directions]
            raise ConfigError(
                f"--objective {spec!r}: choose delta_m, pareto or a validation metric TASK.METRIC: {', '.join(choices)}"
            )
        direction = "maximize" if by_name[task].metric_directions[metric] else "minimize"
        return cls(spec, (spec,), (direction,), names)

    @property
    def needs_experts(self) -> bool:
        return self.spec in ("delta_m", "pareto")

    @property
    def multi(self) -> bool:
        return len(self.names) > 1

    def values(
        self, metrics: Mapping[str, Mapping[str, float]], experts: Baselines | None, tasks: list[Task]
    ) -> list[float]:
        """The objective values of validation ``metrics``."""
        if not self.needs_experts:
            task, _, metric = self.spec.partition(".")
            return [float(metrics[task][metric])]
        assert experts is not None  # delta_m and pareto always train or load experts first
        result = delta_m(
            {t: dict(m) for t, m in metrics.items()}, experts.metrics(self.tasks, "val"), directions(tasks)
        )
        if self.spec == "delta_m":
            return [result.overall]
        return [result.per_task[t] for t in self.tasks]

    def intermediate(self, summary: EpochSummary) -> float | None:
        """The value reported to the pruner after an epoch (single objectives only)."""
        if self.multi or not summary.metrics:
            return None
        if self.spec == "delta_m":
            return summary.delta_m
        task, _, metric = self.spec.partition(".")
        return summary.metrics.get(task, {}).get(metric)


# ------------------------------------------------------------------------------------------------ result
@dataclass
class TrialRow:
    """One trial as the table shows it: state (COMPLETE, PRUNED, FAIL, RUNNING), values, params, reason, run."""

    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    epochs: int | None = None
    reason: str | None = None
    run: str | None = None


@dataclass
class TuneResult:
    """What ``tune`` returns: the best trial's params and values, every trial, importances and the files."""

    study_dir: Path
    study_name: str
    storage: str
    objective: str
    names: list[str]
    directions: list[str]
    best_trial: int | None
    best_params: dict[str, Any]
    best_values: list[float] | None
    best_config: Path | None
    trials: list[TrialRow]
    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    importances_note: str | None = None
    pareto: list[int] = field(default_factory=list)
    baselines: Path | None = None
    epochs_per_trial: int = 0

    @property
    def epochs_trained(self) -> int:
        """Epochs trained over every trial (pruned ones count what they trained): the study's compute."""
        return sum(t.epochs or 0 for t in self.trials)

    def budget(self) -> str:
        """One sentence stating the compute behind the study."""
        done = [t for t in self.trials if t.state != "RUNNING"]
        return (
            f"{len(done)} trials × up to {self.epochs_per_trial} epochs ({self.epochs_trained} epochs trained in all)"
        )


# ------------------------------------------------------------------------------------------------- study
class TuningStudy:
    """The study job: experts once, then trials until the study holds ``trials`` finished ones.

    Args:
        config: the base configuration; each trial overrides it with the space's draw.
        space: the :class:`SearchSpace` (checked against ``config`` before anything runs).
        trials: finished trials the study should hold (a resumed study runs only the missing ones).
        objective: ``delta_m``, ``pareto`` or ``TASK.METRIC``.
        out, study: the study folder is ``out/study`` (default name ``tune-<dataset>``).
        storage: an Optuna storage URL (default: SQLite in the study folder); ``journal:PATH`` for a journal file.
        timeout: seconds after which this worker starts no new trial.
        seed: the sampler's seed (the trials' own seed is the configuration's).
        baselines: experts to reuse (a baselines.json or its folder) instead of training them.
    """

    def __init__(
        self,
        config: RunConfig,
        space: SearchSpace,
        *,
        trials: int = 20,
        objective: str = "delta_m",
        out: str | Path = "runs",
        study: str | None = None,
        storage: str | None = None,
        timeout: float | None = None,
        seed: int = 0,
        baselines: str | Path | None = None,
    ) -> None:
        if trials < 1:
            raise ConfigError(f"--trials must be at least 1 (got {trials})")
        if config.train.select == "last":
            raise ConfigError("tune scores trials on the validation split; train.select=last trains without one")
        self.config, self.space, self.trials, self.timeout, self.seed = config, space, trials, timeout, seed
        self.raw = config.to_dict()
        space.check(self.raw)
        self.tasks = build_tasks(config)
        self.objective = Objective.parse(objective, self.tasks)
        self.name = study or f"tune-{config.data.name}"
        self.dir = Path(out) / self.name
        self.storage_url = storage or f"sqlite:///{(self.dir / STORAGE_NAME).resolve()}"
        self.given_baselines = Path(Baselines.locate(baselines)).resolve() if baselines else None
        self.experts: Baselines | None = None

    # ------------------------------------------------------------------------------------------- running
    def run(self) -> TuneResult:
        """Train the experts if needed, run the missing trials, write the outputs; return the result."""
        optuna = require_optuna()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.objective.needs_experts:
            self.experts = self._experts()
        study = self._open(optuna)
        missing = self.trials - finished_trials(study)
        self._interrupted: TrainingInterrupted | None = None
        if missing > 0:
            logger.info("Study %s: %d trial(s) to run (storage %s).", self.name, missing, self.storage_url)
            study.optimize(
                self._trial,
                n_trials=missing,
                timeout=self.timeout,
                catch=(MtlvisionError, RuntimeError, ValueError),
                callbacks=[self._stop_when_done],
            )
        else:
            logger.info("Study %s already holds %d finished trials.", self.name, self.trials - missing)
        from mtlvision.engine.tuning_report import write_outputs

        result = write_outputs(self, study)
        if self._interrupted is not None:  # Ctrl-C or SIGTERM: the outputs so far are written, then we stop
            raise self._interrupted
        return result

    def _stop_when_done(self, study: optuna.Study, trial: Any) -> None:
        # every worker stops once the study holds enough finished trials, whoever finished them
        if finished_trials(study) >= self.trials:
            study.stop()

    def _experts(self) -> Baselines:
        if self.given_baselines is not None:
            experts = Baselines.load(self.given_baselines)
        else:
            path = self.dir / "baseline" / BASELINES_NAME
            done = path.is_file() and all(t.name in Baselines.load(path).experts for t in self.tasks)
            if not done:
                logger.info("Training the single-task experts once, with the base configuration, into %s.", path.parent)
            experts = Baselines.load(path) if done else train_experts(self.config, out=self.dir, name="baseline")
        experts.metrics((t.name for t in self.tasks), "val")  # every task's expert, validated, or an error now
        return experts

    def _open(self, optuna: Any) -> optuna.Study:
        config = {k: v for k, v in flatten(self.raw).items() if k not in _WORKER_KEYS}
        space = {p.key: p.spec.model_dump(mode="json") for p in self.space.params}
        settings: dict[str, Any] = {"objective": self.objective.spec, "space": space, "config": config}
        if self.objective.multi:
            sampler = optuna.samplers.NSGAIISampler(seed=self.seed)
            pruner = optuna.pruners.NopPruner()
        else:
            sampler = optuna.samplers.TPESampler(seed=self.seed)
            pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
        study = optuna.create_study(
            storage=self._storage(optuna),
            study_name=self.name,
            directions=list(self.objective.directions),
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
        stored = study.user_attrs.get("settings")
        if stored is None:
            study.set_user_attr("settings", settings)
        elif stored != json.loads(json.dumps(settings)):
            before, now = dict(stored.get("config", {})), config
            changed = sorted(k for k in {**before, **now} if before.get(k) != now.get(k))
            what = [k for k in ("objective", "space") if stored[k] != settings[k]] + changed
            raise MtlvisionError(
                f"study {self.name!r} in {self.storage_url} was started with other settings ({', '.join(what)}); "
                "run it with those, or start another study (--study NAME)"
            )
        return study

    def _storage(self, optuna: Any) -> Any:
        if self.storage_url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(self.storage_url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they mark killed trials failed
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(self.storage_url, heartbeat_interval=60, grace_period=180)

    # ------------------------------------------------------------------------------------------ one trial
    def trial_config(self, params: Mapping[str, Any]) -> RunConfig:
        """The base configuration with a trial's params (and the study's experts for Δm)."""
        fixed: dict[str, Any] = {"train.progress": False}
        if self.experts is not None:
            fixed["baselines"] = str(Path(self.experts.path).resolve())
        return validate(apply_overrides(self.raw, {**params, **fixed}))

    def _trial(self, trial: optuna.Trial) -> float | list[float]:
        optuna = require_optuna()
        params = self.space.sample(trial, flatten(self.raw))
        name = f"trial-{trial.number:04d}"
        trial.set_user_attr("run", str(self.dir / TRIALS_DIR / name))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            config = self.trial_config(params)
            run = TrainingRun(config, out=self.dir / TRIALS_DIR, name=name, on_epoch=self._pruning(trial)).execute()
        except optuna.TrialPruned as exc:
            trial.set_user_attr("reason", str(exc))
            raise
        except TrainingInterrupted as exc:  # recorded as failed, not counted; the study stops here
            trial.set_user_attr("reason", f"interrupted: {exc}")
            trial.set_user_attr("interrupted", True)
            self._interrupted = exc
            trial.study.stop()
            raise
        except NonFiniteLossError as exc:
            trial.set_user_attr("reason", f"diverged: {exc}")
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        except Exception as exc:
            trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}")
            logger.warning("Trial %d failed (%s: %s); the study goes on.", trial.number, type(exc).__name__, exc)
            raise
        report = run.evaluated
        if report.val_metrics is None:
            raise MtlvisionError(f"{run.path} has no validation metrics to score")
        values = self.objective.values(report.val_metrics, self.experts, self.tasks)
        if report.delta_m is not None:
            trial.set_user_attr(f"{report.split}_delta_m", report.delta_m["overall"])
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("reason", f"diverged: non-finite objective {values}")
            raise optuna.TrialPruned("diverged: non-finite objective")
        logger.info(
            "Trial %d: %s = %s", trial.number, ", ".join(self.objective.names), ", ".join(f"{v:.4g}" for v in values)
        )
        return values if self.objective.multi else values[0]

    def _pruning(self, trial: optuna.Trial) -> Any:
        optuna = require_optuna()

        def on_epoch(summary: EpochSummary) -> None:
            trial.set_user_attr("epochs", summary.epoch)
            value = self.objective.intermediate(summary)
            if value is None or not math.isfinite(value):
                return
            trial.report(value, summary.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned after epoch {summary.epoch}: validation {self.objective.names[0]} {value:.4g} "
                    "worse than the median of earlier trials"
                )

        return on_epoch


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward ``--trials``: completed, pruned or failed, but not interrupted (Ctrl-C, SIGTERM)."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state.name in ("COMPLETE", "PRUNED") or (t.state.name == "FAIL" and not t.user_attrs.get("interrupted"))
    )


def write_table(path: Path, rows: list[TrialRow], names: list[str]) -> None:
    """``trials.csv``: number, state, each objective, epochs, every param, reason, run."""
    keys = list(dict.fromkeys(k for row in rows for k in row.params))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", *names, "epochs", *keys, "reason", "run"])
        for row in rows:
            values: list[float | None] = list(row.values) if row.values else [None] * len(names)
            writer.writerow(
                [row.number, row.state, *values, row.epochs, *(row.params.get(k) for k in keys), row.reason, row.run]
            )


def write_best(path: Path, config: RunConfig) -> None:
    """``best.yaml``: the best trial's whole configuration, as ``mtlvision train`` reads it."""
    data = config.to_dict()
    data["train"]["progress"] = True
    path.write_text(yaml.safe_dump(data, sort_keys=False))
