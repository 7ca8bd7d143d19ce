"""What the data checks found: :class:`Finding`, per split and task statistics, :class:`DataReport` and its
rich rendering (:func:`render_report`). The checks themselves are in :mod:`mtlvision.data.check` (every
sample) and :mod:`mtlvision.data.preflight` (files only, before training)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rich.console import Group
from rich.table import Table
from rich.text import Text

Severity = Literal["error", "warning"]

DATASET_KINDS = frozenset({"duplicate", "no_target"})
"""Finding kinds about the dataset as a whole (a leak, a task it lacks); every other error is a bad sample:
one that training refuses when it is read, and that ``data.skip_bad`` skips and counts."""


@dataclass(frozen=True)
class Finding:
    """One problem found in one sample (``sample`` is its id: the file's key for file-based datasets)."""

    severity: Severity
    kind: str
    split: str
    sample: str
    task: str | None
    message: str


@dataclass
class TaskStats:
    """What one split holds for one task; ``names`` are the task's class (or label) names, when it has them."""

    labelled: int = 0
    missing: int = 0
    rejected: int = 0
    class_counts: Counter = field(default_factory=Counter)
    value_min: float = float("inf")
    value_max: float = float("-inf")
    value_sum: float = 0.0
    value_count: int = 0
    invalid_pixels: int = 0
    total_pixels: int = 0
    names: list[str] = field(default_factory=list)

    def add(self, other: TaskStats) -> None:
        """Add the label statistics of ``other`` (counts of labelled/missing samples are kept apart)."""
        self.class_counts.update(other.class_counts)
        self.value_min = min(self.value_min, other.value_min)
        self.value_max = max(self.value_max, other.value_max)
        self.value_sum += other.value_sum
        self.value_count += other.value_count
        self.invalid_pixels += other.invalid_pixels
        self.total_pixels += other.total_pixels

    def class_name(self, index: int) -> str:
        """The name of class ``index`` (its number when the task has no name for it)."""
        return self.names[index] if 0 <= index < len(self.names) else str(index)

    def distribution(self) -> str:
        """A one-line summary of the labels: the class histogram (by name) or the value range."""
        parts = []
        if self.class_counts:
            top = sorted(self.class_counts.items())
            shown = ", ".join(f"{self.class_name(k)}:{v}" for k, v in top[:10])
            parts.append(shown + (f", … ({len(top)} classes)" if len(top) > 10 else ""))
        if self.value_count:
            parts.append(f"{self.value_min:.3g}…{self.value_max:.3g} (mean {self.value_sum / self.value_count:.3g})")
        if self.total_pixels:
            parts.append(f"{100.0 * self.invalid_pixels / self.total_pixels:.1f}% pixels unlabelled")
        return "; ".join(parts) or "-"


@dataclass
class SplitStats:
    """``bad``: samples with at least one error of their own (unreadable, refused label, ...): exactly those
    that ``data.skip_bad`` skips in this split."""

    samples: int = 0
    unreadable: int = 0
    bad: int = 0
    tasks: dict[str, TaskStats] = field(default_factory=dict)


@dataclass
class DataReport:
    """The result of :func:`mtlvision.data.check.check_dataset` (or of the file-level preflight)."""

    splits: dict[str, SplitStats]
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def error_count(self) -> int:
        return len(self.errors)

    @property
    def bad_samples(self) -> dict[str, int]:
        """Per split, the samples that ``data.skip_bad`` would skip (see :attr:`SplitStats.bad`)."""
        return {split: stats.bad for split, stats in self.splits.items()}

    def table(self, max_findings: int = 50) -> Group:
        """The rich rendering of :func:`render_report`."""
        return render_report(self, max_findings)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 1 when errors were found, else 0."""
        return 0 if self.ok else 1

    def count(self, kind: str) -> int:
        return sum(f.kind == kind for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "splits": {
                name: {
                    "samples": s.samples,
                    "unreadable": s.unreadable,
                    "bad": s.bad,
                    "tasks": {t: {**asdict(ts), "class_counts": dict(ts.class_counts)} for t, ts in s.tasks.items()},
                }
                for name, s in self.splits.items()
            },
            "findings": [asdict(f) for f in self.findings],
        }


def render_report(report: DataReport, max_findings: int = 50) -> Group:
    """The report as rich tables: a summary per split and task, then the findings (first ``max_findings``)."""
    summary = Table(title="Data check", show_lines=False)
    for column in ("split", "task", "samples", "labelled", "missing", "rejected", "distribution"):
        summary.add_column(column, overflow="fold")
    for split, split_stats in report.splits.items():
        note = ", ".join(
            text for count, text in ((split_stats.unreadable, "unreadable"), (split_stats.bad, "bad samples")) if count
        )
        summary.add_row(split, "(images)", str(split_stats.samples), "", "", str(split_stats.bad), note)
        for task, s in split_stats.tasks.items():
            summary.add_row("", task, "", str(s.labelled), str(s.missing), str(s.rejected), s.distribution())
    if any(report.bad_samples.values()):
        counts = ", ".join(f"{split} {count}" for split, count in report.bad_samples.items())
        summary.caption = (
            f"bad samples ({counts}): training stops at the first one; data.skip_bad=true skips exactly these"
        )
    parts: list[Any] = [summary]
    if report.findings:
        table = Table(title=f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
        for column in ("severity", "kind", "split", "sample", "task", "message"):
            table.add_column(column, overflow="fold")
        for finding in report.findings[:max_findings]:
            style = "red" if finding.severity == "error" else "yellow"
            table.add_row(
                f"[{style}]{finding.severity}[/{style}]",
                finding.kind,
                finding.split,
                Text(finding.sample),
                finding.task or "",
                Text(finding.message),
            )
        if len(report.findings) > max_findings:
            table.caption = f"… and {len(report.findings) - max_findings} more"
        parts.append(table)
    else:
        parts.append("[green]No problems found.[/green]")
    return Group(*parts)
