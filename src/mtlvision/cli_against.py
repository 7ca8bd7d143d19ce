"""``mtlvision eval RUN --against BENCHMARK``: a run's row printed beside a benchmark's published rows."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mtlvision.evaluation.published import PublishedComparison


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def print_against(console: Console, comparison: PublishedComparison) -> None:
    """The side-by-side table, Δm against the published single-task row, and the sources."""
    table = Table(title=f"{comparison.benchmark}: {comparison.description}")
    table.add_column("method")
    for task, metric, higher in comparison.columns:
        table.add_column(f"{task}\n{metric} {'↑' if higher else '↓'}", justify="right")
    table.add_column("Δm % vs\npublished STL", justify="right")
    for row in comparison.rows:
        values = [f"{row.metrics[task][metric]:.4f}" for task, metric, _ in comparison.columns]
        table.add_row(row.method, *values, _percent(row.delta_m))
    console.print(table)
    ours = comparison.rows[-1]
    published = (
        "the benchmark's source publishes no single-task row"
        if ours.delta_m is None
        else f"against the published single-task row: [bold]{ours.delta_m:+.2f}%[/]"
    )
    own = (
        "no Δm against its own single-task experts (none recorded)"
        if comparison.own_delta_m is None
        else f"against its own single-task experts: [bold]{comparison.own_delta_m:+.2f}%[/]"
    )
    console.print(f"Δm of {ours.method}: {published}; {own} (lower is better)")
    for row in comparison.rows[:-1]:
        console.print(f"  {row.method}: {row.source}", highlight=False)
