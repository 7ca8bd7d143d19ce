"""``mtlvision affinity``: its parser and its printing (registered from :mod:`mtlvision.cli`)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table


def cmd_affinity(args: argparse.Namespace) -> int:
    from mtlvision import api
    from mtlvision.cli import console

    result = api.affinity(
        args.config,
        args.set or [],
        every=args.every,
        groups=args.groups,
        validate=args.validate,
        out=args.out,
        name=args.name,
    )
    table = Table(title=f"TAG affinity Z[i→j] over {result.steps} measured steps (row: step on task i)")
    table.add_column("task i \\ j")
    for name in result.tasks:
        table.add_column(name, justify="right")
    for name, row in zip(result.tasks, result.matrix):
        table.add_row(name, *(f"{v:+.3g}" for v in row))
    console.print(table)
    grouping = result.grouping
    search = "exact search" if grouping.exact else "heuristic search (greedy, then swaps)"
    console.print(f"Best split into at most {args.groups} group(s) ({search}), total score {grouping.total:.4g}:")
    for group, scores in zip(grouping.groups, grouping.scores):
        served = [t for t, i in grouping.served_by.items() if grouping.groups[i] == group]
        console.print(
            f"  {' + '.join(group)}: " + ", ".join(f"{t} {s:+.3g}" for t, s in scores.items()) + f" — serves {served}"
        )
    if result.validation is not None:
        _print_validation(result.validation)
    console.print(f"Run saved in [bold]{result.run.path}[/] (affinity.csv, grouping.json, plots/affinity.png)")
    return 0


def _print_validation(validation: dict[str, Any]) -> None:
    from mtlvision.cli import console

    table = Table(title=f"Δm % on the {validation['split']} split against the experts (lower is better)")
    table.add_column("trained together")
    table.add_column("Δm % over its tasks", justify="right")
    for entry in [*validation["groups"], validation["all_together"]]:
        value = entry["delta_m"]
        table.add_row(" + ".join(entry["tasks"]), "—" if value is None else f"{value:+.2f}")
    grouped = validation["grouped"]["delta_m"]
    table.add_row("[bold]the grouping[/] (each task from its group)", "—" if grouped is None else f"{grouped:+.2f}")
    console.print(table)
    for entry in [*validation["groups"], validation["all_together"], validation["grouped"]]:
        if entry.get("note"):
            console.print(f"  {' + '.join(entry.get('tasks', ['the grouping']))}: {entry['note']}")
    console.print(f"  experts: {validation['baselines']}; {validation['compute']}")


def add_parser(verbs: Any, add_config_arguments: Any) -> None:
    """Register ``affinity`` on the CLI's sub-parsers."""
    parser = verbs.add_parser("affinity", help="which tasks help which (TAG affinity), and the best task groups")
    add_config_arguments(parser)
    parser.add_argument("--every", type=int, metavar="K", help="measure the affinity every K steps (default: 20)")
    parser.add_argument(
        "--groups", type=int, default=2, metavar="N", help="split the tasks into at most N networks (default: 2)"
    )
    parser.add_argument(
        "--validate", action="store_true", help="train each chosen group and all tasks together; report their Δm"
    )
    parser.add_argument("--name", help="run folder name (default: affinity-<dataset>)")
    parser.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    parser.set_defaults(handler=cmd_affinity)
