"""What a finished tuning study writes: ``trials.csv``, ``best.yaml``, ``importances.json`` and ``plots/``.

The best trial of a single objective is Optuna's; of ``pareto``, the Pareto-optimal trial with the lowest
mean of its objectives (for per-task Δm, the lowest overall Δm on the front). Importances are Optuna's
fANOVA (Hutter et al. 2014) over the completed trials, per objective; with fewer than two completed trials,
or no parameter that varies, they are left out with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlvision.engine.runs import PLOTS_DIR, write_json
from mtlvision.engine.tuning import (
    BEST_NAME,
    IMPORTANCES_NAME,
    TABLE_NAME,
    TrialRow,
    TuneResult,
    require_optuna,
    write_best,
    write_table,
)
from mtlvision.evaluation.tuning_plots import plot_importances, plot_optimisation_history, plot_pareto_front

if TYPE_CHECKING:
    import optuna

    from mtlvision.engine.tuning import TuningStudy

logger = logging.getLogger(__name__)


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    """Every trial of the study as a :class:`TrialRow`."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        epochs = trial.user_attrs.get("epochs")
        rows.append(
            TrialRow(
                number=trial.number,
                state=trial.state.name,
                values=list(trial.values) if trial.values is not None else None,
                params=dict(trial.params),
                epochs=int(epochs) if epochs is not None else None,
                reason=trial.user_attrs.get("reason"),
                run=trial.user_attrs.get("run"),
            )
        )
    return rows


def _best(job: TuningStudy, study: optuna.Study) -> tuple[Any, list[int]]:
    """The best completed trial (None when there is none) and the numbers of the Pareto-optimal trials."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None, []
    if not job.objective.multi:
        return study.best_trial, [study.best_trial.number]
    front = study.best_trials
    best = min(front, key=lambda t: sum(t.values) / len(t.values))
    return best, sorted(t.number for t in front)


def _importances(job: TuningStudy, study: optuna.Study) -> tuple[dict[str, dict[str, float]], str | None]:
    optuna = require_optuna()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return {}, f"importances need at least two completed trials ({len(complete)} completed)"
    result: dict[str, dict[str, float]] = {}
    for index, name in enumerate(job.objective.names):
        try:
            values = optuna.importance.get_param_importances(
                study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=job.seed),
                target=(lambda t, i=index: t.values[i]) if job.objective.multi else None,
            )
        except (RuntimeError, ValueError) as exc:
            return {}, f"importances not computed: {exc}"
        result[name] = {k: float(v) for k, v in values.items()}
    if not any(result.values()):
        return {}, "importances not computed: no parameter took more than one value in every completed trial"
    return result, None


def write_outputs(job: TuningStudy, study: optuna.Study) -> TuneResult:
    """Write the study's table, best configuration, importances and plots; return the :class:`TuneResult`."""
    rows = trial_rows(study)
    names = list(job.objective.names)
    write_table(job.dir / TABLE_NAME, rows, names)
    best, front = _best(job, study)
    best_config = None
    if best is not None:
        best_config = job.dir / BEST_NAME
        write_best(best_config, job.trial_config(best.params))
    importances, note = _importances(job, study)
    write_json(job.dir / IMPORTANCES_NAME, {"importances": importances, "note": note})
    plots = job.dir / PLOTS_DIR
    complete = [r for r in rows if r.state == "COMPLETE" and r.values is not None]
    if complete and not job.objective.multi:
        plot_optimisation_history(
            [r.number for r in complete],
            [r.values[0] for r in complete if r.values is not None],
            names[0],
            job.objective.directions[0] == "minimize",
            plots / "history.png",
        )
    if complete and job.objective.multi:
        values = [r.values for r in complete if r.values is not None]
        plot_pareto_front(values, [r.number in front for r in complete], names, plots / "pareto.png")
    for name, values_ in importances.items():
        if values_:
            plot_importances(values_, f"parameter importances for {name}", plots / f"importances-{name}.png")
    return TuneResult(
        study_dir=job.dir,
        study_name=job.name,
        storage=job.storage_url,
        objective=job.objective.spec,
        names=names,
        directions=list(job.objective.directions),
        best_trial=best.number if best is not None else None,
        best_params=dict(best.params) if best is not None else {},
        best_values=list(best.values) if best is not None else None,
        best_config=best_config,
        trials=rows,
        importances=importances,
        importances_note=note,
        pareto=front if job.objective.multi else [],
        baselines=Path(job.experts.path) if job.experts is not None else None,
        epochs_per_trial=job.config.train.epochs,
    )
