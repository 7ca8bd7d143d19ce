"""Data checks (``mtlvision data check CONFIG``) and the ``data.skip_bad`` wrapper.

:func:`check_dataset` reads every sample of every split (before augmentation) and returns a
:class:`DataReport`: per split and task the number of samples, labelled and missing labels, the label
distribution (class histogram, or the value range of depth), and a list of findings:

============== ======== ==================================================================================
kind           severity what
============== ======== ==================================================================================
unreadable     error    the sample cannot be loaded (corrupt or missing file); the loader's message names it
bad_image      error    the image is not a finite float ``[3, H, W]`` tensor in [0, 1]
no_target      error    the dataset gives no target at all for a task (not even a placeholder)
invalid_label  error    the task's own ``check_target`` refuses the label (out of range, wrong dtype, ...)
size_mismatch  error    a mask, depth or normal map whose height and width differ from the image's
invalid_depth  error    depth with NaN, infinite or negative values (0 is the "no measurement" marker)
box_outside    error    a box that is empty or reaches outside the image
duplicate      error    the same image (identical decoded pixels) in two splits: a leak into evaluation
duplicate      warning  the same image twice within one split
============== ======== ==================================================================================

:func:`render_report` draws it as rich tables; the CLI exits non-zero when ``report.errors`` is not empty.

:class:`SkipBadSamples` wraps a dataset for training with ``data.skip_bad: true``: a sample whose loading
raises :class:`DataError` is replaced by the next readable one (deterministically: index + 1, + 2, ...),
and the bad indices are recorded in shared memory so that the count is exact across DataLoader workers.
Without the wrapper the DataError propagates and training stops with the file named.
:class:`CheckedSamples` (beneath it) turns a label that the task refuses (out of range, wrong shape) into
such a DataError naming the sample, so that it is skipped or stops the run before it reaches a loss.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Group
from rich.table import Table
from torch import Tensor
from torch.utils.data import Dataset

from mtlvision.errors import DataError
from mtlvision.tasks.base import Task, TargetKind

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem found in one sample."""

    severity: Severity
    kind: str
    split: str
    sample: str
    task: str | None
    message: str


@dataclass
class TaskStats:
    """What one split holds for one task."""

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

    def add(self, other: TaskStats) -> None:
        """Add the label statistics of ``other`` (counts of labelled/missing samples are kept apart)."""
        self.class_counts.update(other.class_counts)
        self.value_min = min(self.value_min, other.value_min)
        self.value_max = max(self.value_max, other.value_max)
        self.value_sum += other.value_sum
        self.value_count += other.value_count
        self.invalid_pixels += other.invalid_pixels
        self.total_pixels += other.total_pixels

    def distribution(self) -> str:
        """A one-line summary of the labels: the class histogram or the value range."""
        parts = []
        if self.class_counts:
            top = sorted(self.class_counts.items())
            shown = ", ".join(f"{k}:{v}" for k, v in top[:10])
            parts.append(shown + (f", … ({len(top)} classes)" if len(top) > 10 else ""))
        if self.value_count:
            parts.append(f"{self.value_min:.3g}…{self.value_max:.3g} (mean {self.value_sum / self.value_count:.3g})")
        if self.total_pixels:
            parts.append(f"{100.0 * self.invalid_pixels / self.total_pixels:.1f}% pixels unlabelled")
        return "; ".join(parts) or "-"


@dataclass
class SplitStats:
    samples: int = 0
    unreadable: int = 0
    tasks: dict[str, TaskStats] = field(default_factory=dict)


@dataclass
class DataReport:
    """The result of :func:`check_dataset`."""

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
                name: {"samples": s.samples, "unreadable": s.unreadable,
                       "tasks": {t: {**asdict(ts), "class_counts": dict(ts.class_counts)} for t, ts in s.tasks.items()}}
                for name, s in self.splits.items()
            },
            "findings": [asdict(f) for f in self.findings],
        }


# ----------------------------------------------------------------------------------- per-kind inspection
Inspector = Callable[[Task, Any, tuple[int, int], TaskStats], list[tuple[str, str]]]


def _size(target: Tensor, image_size: tuple[int, int]) -> list[tuple[str, str]]:
    if tuple(target.shape[-2:]) != image_size:
        return [("size_mismatch", f"target is {tuple(target.shape[-2:])} but the image is {image_size} (H, W)")]
    return []


def _label(task: Task, target: Any, image_size: tuple[int, int], stats: TaskStats) -> list[tuple[str, str]]:
    stats.class_counts[int(target)] += 1
    return []


def _labels(task: Task, target: Any, image_size: tuple[int, int], stats: TaskStats) -> list[tuple[str, str]]:
    for index in torch.nonzero(target > 0.5).flatten().tolist():
        stats.class_counts[index] += 1
    return []


def _mask(task: Task, target: Any, image_size: tuple[int, int], stats: TaskStats) -> list[tuple[str, str]]:
    ignore = int(getattr(task, "ignore_index", 255))
    labelled = target[target != ignore]
    for value, count in zip(*np.unique(labelled.numpy(), return_counts=True)):
        stats.class_counts[int(value)] += int(count)
    stats.invalid_pixels += int(target.numel() - labelled.numel())
    stats.total_pixels += int(target.numel())
    return _size(target, image_size)


def _depth(task: Task, target: Any, image_size: tuple[int, int], stats: TaskStats) -> list[tuple[str, str]]:
    values = target.float()
    valid = values[values > 0]
    if valid.numel():
        stats.value_min = min(stats.value_min, float(valid.min()))
        stats.value_max = max(stats.value_max, float(valid.max()))
        stats.value_sum += float(valid.double().sum())
        stats.value_count += int(valid.numel())
    stats.invalid_pixels += int((values == 0).sum())
    stats.total_pixels += int(values.numel())
    return _size(target, image_size)


def _normals(task: Task, target: Any, image_size: tuple[int, int], stats: TaskStats) -> list[tuple[str, str]]:
    zero = target.abs().sum(0) == 0
    stats.invalid_pixels += int(zero.sum())
    stats.total_pixels += int(zero.numel())
    return _size(target, image_size)


def _boxes(task: Task, target: Any, image_size: tuple[int, int], stats: TaskStats) -> list[tuple[str, str]]:
    boxes, labels = target["boxes"], target["labels"]
    for label in labels.tolist():
        stats.class_counts[int(label)] += 1
    height, width = image_size
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]) | (boxes[:, :2] < 0).any(1) \
        | (boxes[:, 2] > width) | (boxes[:, 3] > height)
    if bad.any():
        return [("box_outside", f"{int(bad.sum())} box(es) empty or outside the {width}x{height} image, e.g. "
                                f"{[round(v, 1) for v in boxes[bad][0].tolist()]}")]
    return []


INSPECTORS: dict[TargetKind, Inspector] = {
    TargetKind.LABEL: _label,
    TargetKind.LABELS: _labels,
    TargetKind.MASK: _mask,
    TargetKind.DEPTH: _depth,
    TargetKind.NORMALS: _normals,
    TargetKind.BOXES: _boxes,
}
"""Per target kind: statistics gathered and kind-specific problems (beyond the task's ``check_target``)."""


def _invalid_depth(target: Any) -> list[tuple[str, str]]:
    if not isinstance(target, Tensor) or not target.is_floating_point():
        return []
    nonfinite = int((~torch.isfinite(target)).sum())
    negative = int((target < 0).sum())
    if nonfinite or negative:
        return [("invalid_depth", f"{nonfinite} NaN/infinite and {negative} negative depth values (mark "
                                  "missing depth with 0)")]
    return []


PRECHECKS: dict[TargetKind, Callable[[Any], list[tuple[str, str]]]] = {TargetKind.DEPTH: _invalid_depth}
"""Kind-specific problems reported under their own name before the task's ``check_target`` runs."""


def _problems(task: Task, target: Any, where: str, image_size: tuple[int, int], stats: TaskStats
              ) -> list[tuple[str, str]]:
    """The problems of one labelled target; statistics are gathered only from targets that pass."""
    early = PRECHECKS.get(task.target_kind, lambda _: [])(target)
    if early:
        return early
    try:
        task.check_target(target, where)
    except DataError as error:
        return [("invalid_label", str(error))]
    scratch = TaskStats()
    problems = INSPECTORS[task.target_kind](task, target, image_size, scratch)
    if not problems:
        stats.add(scratch)
    return problems


def image_digest(image: Tensor) -> str:
    """A hash of the decoded pixels (identical images hash alike whatever their file names)."""
    array = np.ascontiguousarray(image.detach().cpu().numpy())
    return hashlib.blake2b(array.tobytes() + str(array.shape).encode(), digest_size=16).hexdigest()


def _image_problem(image: Any) -> str | None:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        return f"the image must be a float [3, H, W] tensor, got {shape}"
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        return "the image holds values outside [0, 1] or non-finite values"
    return None


def check_dataset(
    splits: Mapping[str, Dataset],
    tasks: Mapping[str, Task],
    progress: Callable[[str, int, int], None] | None = None,
) -> DataReport:
    """Read every sample of every split and report counts, label distributions and problems.

    ``splits`` maps a split name to its dataset (untransformed); ``tasks`` the tasks to check. ``progress``
    is called as ``progress(split, done, total)`` after each sample.
    """
    findings: list[Finding] = []
    stats: dict[str, SplitStats] = {}
    seen: dict[str, tuple[str, str]] = {}
    for split, dataset in splits.items():
        split_stats = stats[split] = SplitStats(tasks={name: TaskStats() for name in tasks})
        total = len(dataset)  # type: ignore[arg-type]
        absent: set[str] = set()
        for index in range(total):
            split_stats.samples += 1

            def report(kind: str, message: str, task: str | None = None, severity: Severity = "error",
                       sample: str = f"{split}[{index}]") -> None:
                findings.append(Finding(severity, kind, split, sample, task, message))

            try:
                item = dataset[index]
            except DataError as error:
                split_stats.unreadable += 1
                report("unreadable", str(error))
                continue
            sample_id = str(item.get("id", index))
            where = f"{split}/{sample_id}"
            image = item["image"]
            problem = _image_problem(image)
            if problem:
                report("bad_image", problem, sample=sample_id)
                continue
            digest = image_digest(image)
            if digest in seen:
                other_split, other_id = seen[digest]
                report("duplicate", f"same image as {other_split}/{other_id}", sample=sample_id,
                       severity="error" if other_split != split else "warning")
            else:
                seen[digest] = (split, sample_id)
            image_size = (int(image.shape[-2]), int(image.shape[-1]))
            for name, task in tasks.items():
                task_stats = split_stats.tasks[name]
                if name not in item["targets"]:
                    if name not in absent:
                        absent.add(name)
                        report("no_target", f"the dataset gives no target for task {name!r}", name, sample=sample_id)
                    task_stats.missing += 1
                    continue
                if not item["valid"].get(name, False):
                    task_stats.missing += 1
                    continue
                target = item["targets"][name]
                problems = _problems(task, target, where, image_size, task_stats)
                for kind, message in problems:
                    report(kind, message, name, sample=sample_id)
                if problems:
                    task_stats.rejected += 1
                else:
                    task_stats.labelled += 1
            if progress is not None:
                progress(split, index + 1, total)
    return DataReport(stats, findings)


def render_report(report: DataReport, max_findings: int = 50) -> Group:
    """The report as rich tables: a summary per split and task, then the findings (first ``max_findings``)."""
    summary = Table(title="Data check", show_lines=False)
    for column in ("split", "task", "samples", "labelled", "missing", "rejected", "distribution"):
        summary.add_column(column, overflow="fold")
    for split, split_stats in report.splits.items():
        summary.add_row(split, "(images)", str(split_stats.samples), "", "", str(split_stats.unreadable),
                        "unreadable" if split_stats.unreadable else "")
        for task, s in split_stats.tasks.items():
            summary.add_row("", task, "", str(s.labelled), str(s.missing), str(s.rejected), s.distribution())
    parts: list[Any] = [summary]
    if report.findings:
        table = Table(title=f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
        for column in ("severity", "kind", "split", "sample", "task", "message"):
            table.add_column(column, overflow="fold")
        for finding in report.findings[:max_findings]:
            style = "red" if finding.severity == "error" else "yellow"
            table.add_row(f"[{style}]{finding.severity}[/{style}]", finding.kind, finding.split, finding.sample,
                          finding.task or "", finding.message)
        if len(report.findings) > max_findings:
            table.caption = f"… and {len(report.findings) - max_findings} more"
        parts.append(table)
    else:
        parts.append("[green]No problems found.[/green]")
    return Group(*parts)


class SkipBadSamples(Dataset):
    """``data.skip_bad``: replace unreadable samples by the next readable one and count them.

    Skipping is deterministic (index + 1, + 2, ... modulo the length), so a run is reproducible. The bad
    indices live in a shared-memory tensor, so :attr:`skipped` is exact across DataLoader worker processes
    (including those started with fork or spawn).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.bad = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()  # type: ignore[arg-type]
        self.messages: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.bad)

    def __getitem__(self, index: int) -> Any:
        size = len(self.bad)
        for step in range(size):
            candidate = (index + step) % size
            if self.bad[candidate]:
                continue
            try:
                return self.dataset[candidate]
            except DataError as error:
                self.bad[candidate] = True
                self.messages[candidate] = str(error)
        raise DataError(f"every one of the {size} samples failed to load; the last error: "
                        f"{next(reversed(self.messages.values()), 'none recorded')}")

    @property
    def skipped(self) -> int:
        """How many distinct samples were found unreadable so far."""
        return int(self.bad.sum())


class CheckedSamples(Dataset):
    """Each labelled target passes its task's ``check_target`` as it is read; a refused one raises DataError.

    ``tasks`` maps the task names to check to their tasks; targets of other tasks pass unchecked. The error
    names the split and the sample id (the file, for file-based datasets).
    """

    def __init__(self, dataset: Dataset, tasks: Mapping[str, Task], split: str) -> None:
        self.dataset = dataset
        self.tasks = dict(tasks)
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        where = f"{self.split} sample {item.get('id', index)}"
        for name, task in self.tasks.items():
            if item["valid"].get(name, False):
                task.check_target(item["targets"][name], where)
        return item
