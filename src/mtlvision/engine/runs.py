"""The run folder: every file name it holds, its typed report, the experts' baselines, and reading it back.

A run folder (``runs/<name>``) holds ``config.yaml`` (fully resolved), ``metrics.json`` (a
:class:`RunReport`), ``history.csv``, ``model.safetensors`` (best weights), ``checkpoint.pt`` (resumable),
``tb/`` and ``plots/``; an expert also keeps ``init.safetensors`` (its initial weights, the base of task
vectors), and a folder of experts holds ``baselines.json`` (:class:`Baselines`) beside the experts' run
folders. While a process trains in a run folder it holds ``.lock`` there
(:mod:`~mtlvision.engine.run_lock`). Changing the format of a run folder means changing this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlvision.config import RunConfig, read_yaml, validate
from mtlvision.engine.checkpoint import atomic_write
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.evaluation.delta_m import delta_m
from mtlvision.run_settings import comparable_settings, differences, flatten
from mtlvision.tasks import Task

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"
HISTORY_NAME = "history.csv"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_NAME = "checkpoint.pt"
INIT_WEIGHTS_NAME = "init.safetensors"
BASELINES_NAME = "baselines.json"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tb"
LOCK_NAME = ".lock"

Metrics = dict[str, dict[str, float]]


def new_run_dir(out: str | Path, name: str) -> Path:
    """``out/name``, or ``out/name-2``, ``-3``... when taken (ultralytics-style increments).

    Each candidate is claimed with one ``mkdir`` (no check-then-create), so two processes starting at once
    get two folders."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    candidate, index = out / name, 2
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate, index = out / f"{name}-{index}", index + 1


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def write_config(run_dir: Path, config: RunConfig) -> None:
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write(run_dir / CONFIG_NAME, lambda tmp: tmp.write_text(text))


def read_config(run_dir: Path) -> RunConfig:
    """A run folder's ``config.yaml``; anything but a valid configuration is a ConfigError naming the file."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise MtlvisionError(f"{run_dir} is not an mtlvision run folder (no {CONFIG_NAME})")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc})") from None
    raw = read_yaml(text, str(path))  # safe_load: a !!python tag is refused as invalid YAML, never run
    try:
        return validate(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path} is not a configuration mtlvision wrote. {exc}") from None


def directions(tasks: Iterable[Task]) -> dict[str, dict[str, bool]]:
    """Each task's metrics with their direction (True where higher is better)."""
    return {t.name: dict(t.metric_directions) for t in tasks}


# ------------------------------------------------------------------------------------------------ report
@dataclass
class RunReport:
    """What ``metrics.json`` holds: the evaluation split's metrics per task and what they were measured on.

    ``delta_m`` is Δm against the single-task experts (``overall``, ``per_task``, ``per_metric``, the
    ``baselines`` file and each expert's run) or None, with ``delta_m_note`` saying why;
    ``delta_m_warning`` names the settings in which the run and its experts differ (beyond tasks, balancing
    and names); ``compute`` is the training budget behind the run (:func:`training_compute`), and ``delta_m``
    holds it beside each expert's, so that every Δm states what each side was trained with; ``merge``
    describes a merged model; ``skipped_samples`` counts samples skipped per split under ``data.skip_bad``;
    ``selection`` says how the kept epoch was chosen (``train.select``).
    """

    split: str
    metrics: Metrics
    val_metrics: Metrics | None = None
    best_epoch: int | None = None
    model: dict[str, Any] | None = None
    merge: dict[str, Any] | None = None
    skipped_samples: dict[str, int] | None = None
    selection: str | None = None
    delta_m: dict[str, Any] | None = None
    delta_m_note: str | None = None
    delta_m_warning: str | None = None
    compute: dict[str, int] | None = None

    _ORDER = (
        "split",
        "metrics",
        "val_metrics",
        "best_epoch",
        "selection",
        "compute",
        "model",
        "merge",
        "skipped_samples",
    )
    _DELTA = ("delta_m_note", "delta_m_warning")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: optional sections only when present, ``delta_m`` always (None when not computed)."""
        data: dict[str, Any] = {k: getattr(self, k) for k in self._ORDER if getattr(self, k) is not None}
        data["delta_m"] = self.delta_m
        data.update({k: getattr(self, k) for k in self._DELTA if getattr(self, k) is not None})
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        known = {*cls._ORDER, "delta_m", *cls._DELTA}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, run_dir: Path) -> None:
        write_json(Path(run_dir) / METRICS_NAME, self.to_dict())


# --------------------------------------------------------------------------------------------- baselines
@dataclass
class Expert:
    """One single-task expert: its run folder, its metrics per split, and the settings it was trained with
    (:func:`~mtlvision.run_settings.comparable_settings`; None in files from older versions) and its training
    budget (:func:`training_compute`; None where unknown)."""

    run: str
    metrics: dict[str, dict[str, float]]
    settings: dict[str, Any] | None = None
    compute: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"run": self.run, "metrics": self.metrics}
        if self.settings is not None:
            data["settings"] = self.settings
        if self.compute is not None:
            data["compute"] = self.compute
        return data


@dataclass
class Baselines:
    """``baselines.json``: the single-task experts of one dataset, for Δm, merging and distillation."""

    path: Path
    data: dict[str, Any]
    experts: dict[str, Expert] = field(default_factory=dict)

    @staticmethod
    def default_path(out: str | Path, config: RunConfig) -> Path:
        """Where ``baseline`` stores the experts of this dataset: ``OUT/baseline-<data>/baselines.json``."""
        return Path(out) / f"baseline-{config.data.name}" / BASELINES_NAME

    @staticmethod
    def for_run(run_dir: Path, config: RunConfig) -> Path:
        """The baselines a run is measured against: ``baselines`` from its config; for an expert (a run folder
        inside a folder of experts) that folder's own file; else the default beside the run."""
        if config.baselines:
            return Path(config.baselines)
        parent = Path(run_dir).parent
        if (parent / BASELINES_NAME).is_file():
            return parent / BASELINES_NAME
        return Baselines.default_path(parent, config)

    @staticmethod
    def locate(source: str | Path) -> Path:
        """A ``baselines.json`` given as the file or the folder holding it."""
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / BASELINES_NAME
        if not path.is_file():
            raise MtlvisionError(
                f"{source} is neither a {BASELINES_NAME} nor a folder holding one (from `mtlvision baseline`)"
            )
        return path

    @classmethod
    def load(cls, source: str | Path) -> Baselines:
        path = cls.locate(source)
        try:
            stored = json.loads(path.read_text())
            experts = {
                task: Expert(run=e["run"], metrics=e["metrics"], settings=e.get("settings"), compute=e.get("compute"))
                for task, e in stored.get("experts", {}).items()
            }
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise MtlvisionError(
                f"{path} is not a baselines file mtlvision wrote ({type(exc).__name__}: {exc})"
            ) from None
        return cls(path=path, data=stored.get("data", {}), experts=experts)

    @classmethod
    def open(cls, path: Path, data: dict[str, Any]) -> Baselines:
        """The baselines at ``path`` to be completed, or new ones; refused when they hold another dataset."""
        baselines = cls.load(path) if path.is_file() else cls(path=path, data=data)
        changed = baselines.data_differences(data)
        if changed:
            raise MtlvisionError(
                f"{path} holds experts trained on other data ({'; '.join(changed)}); choose another --name"
            )
        return baselines

    def data_differences(self, data: Mapping[str, Any]) -> list[str]:
        """The ``data.*`` keys in which ``data`` (a run's dataset parameters) differs from the experts'."""
        return differences(flatten(data, "data"), flatten(self.data, "data"), ("run", "experts"))

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "experts": {t: e.to_dict() for t, e in self.experts.items()}}

    def save(self) -> None:
        write_json(self.path, self.to_dict())

    def record(self, task: str, run: Run) -> None:
        """Store the finished expert ``run`` of ``task`` (its evaluation split's and validation metrics)."""
        report = run.evaluated
        metrics = {report.split: report.metrics[task]}
        if report.val_metrics is not None:
            metrics["val"] = report.val_metrics[task]
        self.experts[task] = Expert(
            run=str(run.path), metrics=metrics, settings=comparable_settings(run.config), compute=report.compute
        )

    def settings_warning(self, config: RunConfig, tasks: Iterable[str]) -> str | None:
        """A sentence naming the settings in which a run differs from the experts of ``tasks`` (beyond tasks,
        balancing and names: :data:`~mtlvision.run_settings.DELTA_M_EXEMPT`), or None when they agree."""
        mine = comparable_settings(config)
        differing: dict[str, list[str]] = {}
        for task in tasks:
            theirs = self.experts[task].settings
            if theirs is None:  # an older file: the expert's own config.yaml, when it is still there
                folder = Path(self.experts[task].run)
                if not (folder / CONFIG_NAME).is_file():
                    folder = self.path.parent / folder.name
                try:
                    theirs = comparable_settings(read_config(folder))
                except MtlvisionError:
                    continue
            for line in differences(mine, theirs, ("run", "expert")):
                differing.setdefault(line, []).append(task)
        if not differing:
            return None
        return (
            "the run and its single-task experts differ in "
            + "; ".join(f"{line} [{', '.join(tasks_)}]" for line, tasks_ in differing.items())
            + "; Δm compares more than multi-task learning"
        )

    def expert_runs(self) -> dict[str, Path]:
        """The experts' run folders by task; a run stored relative to another working directory is looked
        for beside the file as well."""
        found: dict[str, Path] = {}
        for task, expert in self.experts.items():
            candidates = [Path(expert.run), self.path.parent / Path(expert.run).name]
            run = next((c for c in candidates if (c / WEIGHTS_NAME).is_file()), None)
            if run is None:
                raise MtlvisionError(
                    f"{self.path}: the expert run of task {task!r} ({expert.run}) holds no {WEIGHTS_NAME}"
                )
            found[task] = run
        return found

    def metrics(self, tasks: Iterable[str], split: str) -> Metrics:
        """The experts' metrics on ``split`` for ``tasks`` (all must be there)."""
        names = list(tasks)
        missing = [t for t in names if t not in self.experts or split not in self.experts[t].metrics]
        if missing:
            raise MtlvisionError(f"{self.path} has no expert for task(s) {', '.join(missing)} on the {split} split")
        return {t: self.experts[t].metrics[split] for t in names}


def training_compute(epochs: int, steps: int, train_images: int, batch_size: int) -> dict[str, int]:
    """A run's training budget as reports state it: epochs trained, optimiser steps, images in the train split
    and the batch size. Every task of a joint run sees the same ``epochs × train_images`` images (labelled for
    it or not), so the budget per task is comparable with each single-task expert's."""
    return {"epochs": epochs, "steps": steps, "train_images": train_images, "batch_size": batch_size}


def compute_text(compute: Mapping[str, int] | None) -> str:
    """``4 epochs, 188 steps of 32 (6000 images seen per task)``, or ``unknown``."""
    if not compute:
        return "unknown"
    seen = compute["epochs"] * compute["train_images"]
    return (
        f"{compute['epochs']} epochs, {compute['steps']} steps of {compute['batch_size']} ({seen} images seen per task)"
    )


def delta_m_against(
    path: Path,
    config: RunConfig,
    tasks: Iterable[Task],
    metrics: Metrics,
    split: str,
    compute: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Δm of ``metrics`` against the experts stored at ``path``, as the :class:`RunReport` fields ``delta_m``
    (None when it cannot be computed), ``delta_m_note`` (why not) and ``delta_m_warning`` (settings that differ).
    ``delta_m["compute"]`` states the budget of each side: the run's ``compute`` and each expert's."""
    tasks = list(tasks)
    if not path.is_file():
        return {"delta_m": None, "delta_m_note": f"no baselines at {path}; run `mtlvision baseline` for Δm"}
    baselines = Baselines.load(path)
    changed = baselines.data_differences(config.data.dataset_params)
    if changed:
        note = f"baselines at {path} were trained on other data ({'; '.join(changed)}); Δm needs experts on that data"
        return {"delta_m": None, "delta_m_note": note}
    experts = baselines.experts
    missing = [t.name for t in tasks if t.name not in experts or split not in experts[t.name].metrics]
    if missing:
        return {"delta_m": None, "delta_m_note": f"baselines at {path} lack task(s) {', '.join(missing)}"}
    try:
        result = delta_m(metrics, baselines.metrics((t.name for t in tasks), split), directions(tasks))
    except MtlvisionError as exc:  # a metric that is not finite (a diverged run): said, not fatal to the report
        return {"delta_m": None, "delta_m_note": f"Δm not computed: {exc}"}
    return {
        "delta_m": {
            **result.to_dict(),
            "baselines": str(path),
            "experts": {t.name: baselines.experts[t.name].run for t in tasks},
            "compute": {"run": compute, "experts": {t.name: baselines.experts[t.name].compute for t in tasks}},
        },
        "delta_m_warning": baselines.settings_warning(config, (t.name for t in tasks)),
    }


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class Run:
    """A run folder and what it holds.

    ``metrics`` maps each task to its metrics on the evaluation split, plus ``delta_m`` (overall Δm in %,
    lower is better) when single-task baselines were available; ``report`` is the whole metrics.json
    (None for a run that has not been evaluated yet).
    """

    path: Path
    config: RunConfig
    report: RunReport | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        if self.report is None:
            return {}
        result: dict[str, Any] = dict(self.report.metrics)
        if self.report.delta_m is not None:
            result["delta_m"] = self.report.delta_m["overall"]
        return result

    @property
    def evaluated(self) -> RunReport:
        """The report, or an error saying the run has none."""
        if self.report is None:
            raise MtlvisionError(f"{self.path} holds no {METRICS_NAME}; evaluate it first (`mtlvision eval`)")
        return self.report

    @classmethod
    def load(cls, path: str | Path) -> Run:
        path = Path(path)
        config = read_config(path)
        report_path = path / METRICS_NAME
        if not report_path.is_file():
            return cls(path=path, config=config)
        try:
            report = RunReport.from_dict(json.loads(report_path.read_text()))
        except (ValueError, TypeError, AttributeError) as exc:
            raise MtlvisionError(f"{report_path} is not a metrics file mtlvision wrote ({exc})") from None
        return cls(path=path, config=config, report=report)
