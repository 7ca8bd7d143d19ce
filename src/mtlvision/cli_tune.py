"""``mtlvision tune``: its arguments and what it prints (the study itself is :mod:`mtlvision.engine.tuning`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING:
    from mtlvision.engine.tuning import TuneResult

#: most trials the printed table shows (trials.csv holds them all)
_SHOWN = 30


def add_parser(verbs: Any, config_arguments: Any) -> None:
    """Register ``tune`` on the CLI's subparsers; ``config_arguments`` adds CONFIG and --set."""
    tune = verbs.add_parser("tune", help="search hyper-parameters with Optuna; each trial a run folder")
    config_arguments(tune)
    tune.add_argument("--space", help="search-space YAML (default: balancer, architecture, lr, weight decay, augment)")
    tune.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (default: 20)")
    tune.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    tune.add_argument(
        "--objective", default="delta_m", help="delta_m (default), TASK.METRIC, or pareto (one objective per task)"
    )
    tune.add_argument("--storage", help="Optuna storage URL, or journal:PATH (default: SQLite in the study folder)")
    tune.add_argument("--study", help="study name and folder (default: tune-<dataset>)")
    tune.add_argument("--out", default="runs", help="parent folder of the study folder (default: runs)")
    tune.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: 0)")
    tune.add_argument("--baselines", help="reuse these experts (a baselines.json or its folder) for delta_m/pareto")
    tune.set_defaults(handler=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from mtlvision import api
    from mtlvision.cli import console

    result = api.tune(
        args.config,
        args.set or [],
        space=args.space,
        trials=args.trials,
        timeout=args.timeout,
        objective=args.objective,
        storage=args.storage,
        study=args.study,
        out=args.out,
        seed=args.seed,
        baselines=args.baselines,
    )
    console.print(trials_table(result))
    console.print(f"Budget: {result.budget()}.")
    if result.best_trial is None:
        console.print("[yellow]No trial completed[/]; trials.csv says why each one stopped.")
    else:
        values = ", ".join(f"{n} {v:.4g}" for n, v in zip(result.names, result.best_values or [], strict=True))
        console.print(f"Best: trial {result.best_trial} ({values} on val) — {result.best_params}")
        console.print(f"Retrain it: [bold]mtlvision train {result.best_config}[/]")
    for name, importances in result.importances.items():
        shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(importances.items(), key=lambda kv: -kv[1]))
        console.print(f"Importances for {name}: {shown}")
    if result.importances_note:
        console.print(f"Importances: {result.importances_note}")
    console.print(f"Study saved in [bold]{result.study_dir}[/] (storage {result.storage})")
    return 0


def trials_table(result: TuneResult) -> Table:
    """The last trials, one row each: state, values, params, and why a trial stopped."""
    table = Table(title=f"study {result.study_name}: {result.objective}")
    keys = list(dict.fromkeys(k for row in result.trials for k in row.params))
    for column in ["#", "state", *result.names, *keys, "reason"]:
        table.add_column(column, justify="right" if column not in ("state", "reason") else "left")
    for row in result.trials[-_SHOWN:]:
        values = [f"{v:.4g}" for v in row.values] if row.values else [""] * len(result.names)
        params = [_shown(row.params.get(k)) for k in keys]
        mark = "*" if row.number == result.best_trial or row.number in result.pareto else ""
        table.add_row(f"{row.number}{mark}", row.state, *values, *params, (row.reason or "")[:60])
    return table


def _shown(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
