"""``mtlvision affinity``: TAG's inter-task affinity measured inside one joint run, the best grouping, and
(``validate``) the chosen groups trained and compared against the experts.

:class:`TaskAffinity` is a step probe (:mod:`mtlvision.engine.probes`): every ``every`` steps, before the
optimiser moves, it takes the per-task gradients of the shared parameters the engine recorded (for a
gradient method the ones it computes anyway) and, for each task i, evaluates every task's loss on the same
batch after the lookahead SGD step ``θ_s − η ∇_{θ_s} L_i`` (η: each shared parameter's current learning
rate; the task-specific parameters stay), without gradients and without touching BatchNorm statistics:
``Z^t_{i→j} = 1 − L_j(θ_s^{t+1|i}) / L_j(θ_s^t)`` (Fifty et al., NeurIPS 2021, eq. 2–3; see
:mod:`mtlvision.evaluation.affinity`). Per measured step it costs the per-task gradients (loss-weighting
methods only) and T + 1 forward passes. The run itself is an ordinary training run whose folder also holds
``affinity.csv``, ``plots/affinity.png`` and ``grouping.json`` (and, validated, ``validation.json`` and one
run folder per trained group under ``validate/``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlvision.config import RunConfig
from mtlvision.engine.build import build_tasks
from mtlvision.engine.checkpoint import atomic_write
from mtlvision.engine.job import TrainingRun
from mtlvision.engine.probes import ProbeContext, StepProbe
from mtlvision.engine.runs import PLOTS_DIR, Baselines, Run, directions, write_json
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.evaluation.affinity import Grouping, select_groups
from mtlvision.evaluation.decision_plots import plot_affinity
from mtlvision.evaluation.delta_m import delta_m

logger = logging.getLogger(__name__)

AFFINITY_NAME = "affinity.csv"
GROUPING_NAME = "grouping.json"
VALIDATION_NAME = "validation.json"
#: the default of ``--every``: measured every 20 steps, an affinity run of six scenes tasks with equal weights
#: costs 1.27× a plain one (every 10: 1.72×; benchmarks/decide.py, docs/deciding.md)
DEFAULT_EVERY = 20


class TaskAffinity(StepProbe):
    """TAG's lookahead affinity ``Z[i, j]`` of every ``every``-th step, averaged entry by entry over the
    steps where task j's loss was positive and finite."""

    record = "jacobian"

    def __init__(self, every: int = DEFAULT_EVERY) -> None:
        if every < 1:
            raise ConfigError(f"the affinity is measured every K ≥ 1 steps, got --every {every}")
        super().__init__(every)
        self.names: list[str] = []
        self._sum: np.ndarray | None = None
        self._count: np.ndarray | None = None

    def observe(self, context: ProbeContext) -> dict[str, float]:
        blocks = context.recorded.blocks
        if blocks is None:
            raise MtlvisionError("the affinity probe needs the Jacobian of the shared parameters recorded")
        names = context.task_names
        if self._sum is None or self._count is None:
            self.names, self._sum, self._count = names, np.zeros((len(names),) * 2), np.zeros((len(names),) * 2)
        before = context.task_losses({}).double()
        if not bool(torch.isfinite(before).all()):
            return {}  # a step the trainer skips: nothing to measure
        z = torch.full((len(names), len(names)), math.nan, dtype=torch.float64)
        for i in range(len(names)):
            lookahead = {
                name: param.detach() - lr * (block[i] / context.grad_scale).to(param.dtype)
                for name, param, block, lr in zip(context.shared_names, context.shared, blocks, context.shared_lrs)
            }
            after = context.task_losses(lookahead).double()
            z[i] = 1.0 - after / before
        values = z.cpu().numpy()
        usable = np.isfinite(values) & (before.cpu().numpy() > 0)[None, :]
        self._sum += np.where(usable, values, 0.0)
        self._count += usable
        return {
            f"affinity/{names[i]}->{names[j]}": float(values[i, j])
            for i in range(len(names))
            for j in range(len(names))
            if usable[i, j]
        }

    @property
    def steps(self) -> int:
        """How many steps were measured (the most any entry was)."""
        return int(self._count.max()) if self._count is not None else 0

    def matrix(self) -> np.ndarray:
        """The average ``Z[i, j]`` so far (NaN where never measured)."""
        if self._sum is None or self._count is None:
            raise MtlvisionError("no step's affinity was measured: the run was shorter than --every steps")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._count > 0, self._sum / np.maximum(self._count, 1), math.nan)

    def epoch_end(self) -> dict[str, float]:
        return {"affinity/steps": float(self.steps)} if self._count is not None else {}

    def write(self, run_dir: Path) -> None:
        if self._count is not None:
            write_affinity_csv(run_dir / AFFINITY_NAME, self.matrix(), self.names)

    def state_dict(self) -> dict[str, Any]:
        if self._sum is None or self._count is None:
            return {}
        return {"names": self.names, "sum": self._sum.tolist(), "count": self._count.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.names = list(state["names"])
            self._sum, self._count = np.array(state["sum"], dtype=float), np.array(state["count"], dtype=float)


def write_affinity_csv(path: Path, matrix: np.ndarray, names: list[str]) -> None:
    """``affinity.csv``: one row per task i whose lookahead step was taken, one column per task j."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["step_task", *names])
    for name, row in zip(names, matrix):
        writer.writerow([name, *(f"{v:.6g}" for v in row)])
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue(), newline=""))


@dataclass
class AffinityResult:
    """What ``mtlvision affinity`` finds.

    ``matrix[i][j]`` is the affinity of task ``tasks[i]`` onto ``tasks[j]`` (TAG's Z, averaged over ``steps``
    measured steps); ``grouping`` the chosen groups with their per-task scores; ``run`` the joint run it was
    measured in; ``validation`` (when asked) each trained group's and all-together's Δm against the experts
    and the Δm of the grouping (each task's metrics from the group that serves it).
    """

    tasks: list[str]
    matrix: list[list[float]]
    steps: int
    grouping: Grouping
    run: Run
    validation: dict[str, Any] | None = None


def _experts_for(config: RunConfig, out: Path) -> Path:
    """The baselines ``validate`` compares against, checked before anything is trained."""
    path = Path(config.baselines) if config.baselines else Baselines.default_path(out, config)
    if not path.is_file():
        raise ConfigError(
            f"--validate reports Δm against single-task experts, but there is no {path}; run `mtlvision baseline` "
            "with the same data first, or set baselines=PATH"
        )
    baselines = Baselines.load(path)
    differing = baselines.data_differences(config.data.dataset_params)
    if differing:
        raise ConfigError(f"the experts in {path} were trained on other data: {'; '.join(differing)}")
    baselines.metrics((t.name for t in build_tasks(config)), config.train.eval_split)  # every task has an expert
    return path.resolve()


def _group_run(config: RunConfig, group: tuple[str, ...], experts: Path, folder: Path) -> Run:
    """One group trained on ``config``'s settings (its task entries kept), measured against ``experts``."""
    entries = {entry.name: entry for entry in config.tasks or []}
    changed = config.model_copy(update={"tasks": [entries[name] for name in group], "baselines": str(experts)})
    return TrainingRun(changed, out=folder, name="+".join(group)).execute()


def validate_groups(config: RunConfig, grouping: Grouping, experts: Path, folder: Path) -> dict[str, Any]:
    """Train each chosen group, and all tasks together, on ``config``'s settings; Δm of each against the
    experts (over its own tasks), and of the grouping (each task from the group that serves it)."""
    tasks = build_tasks(config)
    names = [t.name for t in tasks]
    together = tuple(names)
    runs = {group: _group_run(config, group, experts, folder) for group in dict.fromkeys([*grouping.groups, together])}
    baselines = Baselines.load(experts)
    split = config.train.eval_split

    def summary(group: tuple[str, ...]) -> dict[str, Any]:
        report = runs[group].evaluated
        delta = report.delta_m or {}
        return {
            "tasks": list(group),
            "run": str(runs[group].path),
            "delta_m": delta.get("overall"),
            "per_task": delta.get("per_task"),
            "note": report.delta_m_note,
        }

    served = {t: runs[grouping.groups[grouping.served_by[t]]].evaluated.metrics[t] for t in names}
    try:
        result = delta_m(served, baselines.metrics(names, split), directions(tasks))
        grouped: dict[str, Any] = {"delta_m": result.overall, "per_task": result.per_task}
    except MtlvisionError as exc:  # e.g. an expert's metric of exactly 0: said, like a run's own report
        grouped = {"delta_m": None, "note": f"Δm not computed: {exc}"}
    return {
        "split": split,
        "baselines": str(experts),
        "groups": [summary(g) for g in grouping.groups],
        "all_together": summary(together),
        "grouped": grouped,
        "compute": f"every run: {config.train.epochs} epochs of {config.data.name}, seed {config.seed}",
    }


def task_affinity(
    config: RunConfig,
    *,
    every: int = DEFAULT_EVERY,
    groups: int = 2,
    validate: bool = False,
    out: str | Path = "runs",
    name: str | None = None,
) -> AffinityResult:
    """Measure TAG's affinity in one joint run of ``config``, choose up to ``groups`` groups, and (``validate``)
    train them (``mtlvision affinity``).

    Args:
        config: the joint run's configuration (its tasks are the ones grouped).
        every: measure the affinity every that many steps (TAG's k).
        groups: the most groups (networks) to choose.
        validate: also train each chosen group and all tasks together and report their Δm.
        out: the folder the run folder is made in.
        name: the run folder's name (default ``affinity-<data>``).

    Returns:
        The :class:`AffinityResult`; the run folder also holds affinity.csv, grouping.json and the heatmap.
    """
    if groups < 1:
        raise ConfigError(f"--groups must be at least 1, got {groups}")
    if len(build_tasks(config)) < 2:
        raise ConfigError("task affinity needs at least two tasks; set tasks=[a,b,...]")
    experts = _experts_for(config, Path(out)) if validate else None
    probe = TaskAffinity(every)
    run = TrainingRun(config, out=out, name=name or f"affinity-{config.data.name}", probes=[probe]).execute()
    matrix, names = probe.matrix(), probe.names
    grouping = select_groups(matrix, names, groups)
    write_affinity_csv(run.path / AFFINITY_NAME, matrix, names)
    plot_affinity(matrix, names, run.path / PLOTS_DIR / "affinity.png", f"TAG affinity Z[i→j], {probe.steps} steps")
    write_json(run.path / GROUPING_NAME, {**grouping.to_dict(), "steps": probe.steps, "every": every})
    validation = None
    if experts is not None:
        validation = validate_groups(run.config, grouping, experts, run.path / "validate")
        write_json(run.path / VALIDATION_NAME, validation)
    logger.info("Affinity over %d steps written to %s.", probe.steps, run.path / AFFINITY_NAME)
    return AffinityResult(names, matrix.tolist(), probe.steps, grouping, run, validation)
