"""Data checks (``mtlvision data check CONFIG``): every sample of every split, read and judged.

:func:`check_dataset` reads every sample of every split (before augmentation) and returns a
:class:`~mtlvision.data.report.DataReport`: per split and task the number of samples, labelled and missing
labels, the label distribution (class histogram by class name, or the value range of depth), and a list of
findings:

============== ======== ==================================================================================
kind           severity what
============== ======== ==================================================================================
unreadable     error    the sample cannot be loaded (corrupt or missing file); the loader's message names it
too_large      error    an image with more pixels than ``data.max_pixels`` (refused before decoding)
outside_root   error    a dataset file names a path outside the dataset's folder (refused, never read)
bad_image      error    the image is not a finite float ``[3, H, W]`` tensor in [0, 1]
no_target      error    the dataset gives no target at all for a task (not even a placeholder)
invalid_label  error    the task's own ``check_target`` refuses the label (out of range, wrong dtype, ...)
size_mismatch  error    a mask, depth or normal map whose height and width differ from the image's
invalid_depth  error    depth with NaN, infinite or negative values (0 is the "no measurement" marker)
box_outside    error    a box that is empty or reaches outside the image
point_outside  error    a labelled keypoint outside the image
duplicate      error    the same image (identical decoded pixels) in two splits: a leak into evaluation
duplicate      warning  the same image twice within one split
============== ======== ==================================================================================

Every error but ``duplicate`` and ``no_target`` is a *bad sample*, judged by :func:`sample_problems`, the one
function that training uses too (:class:`~mtlvision.data.guard.CheckedSamples`): a bad sample stops training
with its file named, or is skipped and counted under ``data.skip_bad``, and the count equals the report's
``bad_samples``. :func:`~mtlvision.data.report.render_report` draws the report; the CLI exits non-zero when
``report.errors`` is not empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlvision.data.datasets.base import SampleSource, sample_source_of
from mtlvision.data.guard import CheckedSamples, SkipBadSamples
from mtlvision.data.problems import sample_problems, target_problems
from mtlvision.data.report import (
    DataReport,
    Finding,
    Severity,
    SplitStats,
    TaskStats,
    render_report,
)
from mtlvision.errors import DataError
from mtlvision.tasks.base import TargetKind, Task

__all__ = [
    "CheckedSamples",
    "DataReport",
    "Finding",
    "SkipBadSamples",
    "SplitStats",
    "TaskStats",
    "check_dataset",
    "image_digest",
    "render_report",
    "sample_problems",
    "target_problems",
]

# ------------------------------------------------------------------------------------------ statistics
Inspector = Callable[[Task, Any, TaskStats], None]


def _label(task: Task, target: Any, stats: TaskStats) -> None:
    stats.class_counts[int(target)] += 1


def _labels(task: Task, target: Any, stats: TaskStats) -> None:
    for index in torch.nonzero(target > 0.5).flatten().tolist():
        stats.class_counts[index] += 1


def _mask(task: Task, target: Any, stats: TaskStats) -> None:
    ignore = int(getattr(task, "ignore_index", 255))
    labelled = target[target != ignore]
    for value, count in zip(*np.unique(labelled.numpy(), return_counts=True)):
        stats.class_counts[int(value)] += int(count)
    stats.invalid_pixels += int(target.numel() - labelled.numel())
    stats.total_pixels += int(target.numel())


def _depth(task: Task, target: Any, stats: TaskStats) -> None:
    values = target.float()
    valid = values[values > 0]
    if valid.numel():
        stats.value_min = min(stats.value_min, float(valid.min()))
        stats.value_max = max(stats.value_max, float(valid.max()))
        stats.value_sum += float(valid.double().sum())
        stats.value_count += int(valid.numel())
    stats.invalid_pixels += int((values == 0).sum())
    stats.total_pixels += int(values.numel())


def _normals(task: Task, target: Any, stats: TaskStats) -> None:
    zero = target.abs().sum(0) == 0
    stats.invalid_pixels += int(zero.sum())
    stats.total_pixels += int(zero.numel())


def _boxes(task: Task, target: Any, stats: TaskStats) -> None:
    for label in target["labels"].tolist():
        stats.class_counts[int(label)] += 1


def _keypoints(task: Task, target: Any, stats: TaskStats) -> None:
    """Labelled keypoints counted per keypoint index."""
    for index in torch.nonzero(target["keypoints"][..., 2] > 0)[:, 1].tolist():
        stats.class_counts[int(index)] += 1


INSPECTORS: dict[TargetKind, Inspector] = {
    TargetKind.LABEL: _label,
    TargetKind.LABELS: _labels,
    TargetKind.MASK: _mask,
    TargetKind.EDGES: _mask,
    TargetKind.DEPTH: _depth,
    TargetKind.NORMALS: _normals,
    TargetKind.BOXES: _boxes,
    TargetKind.KEYPOINTS: _keypoints,
}
"""Per target kind: the statistics gathered from a target that passed every check."""


def class_names(task: Task) -> list[str]:
    """The task's class names (``class_names``, or ``label_names`` for multi-label tasks); empty when none."""
    names = getattr(task, "class_names", None) or getattr(task, "label_names", None) or []
    return [str(name) for name in names]


def image_digest(image: Tensor) -> str:
    """A hash of the decoded pixels (identical images hash alike whatever their file names)."""
    array = np.ascontiguousarray(image.detach().cpu().numpy())
    return hashlib.blake2b(array.tobytes() + str(array.shape).encode(), digest_size=16).hexdigest()


def _sample_name(dataset: Dataset, split: str, index: int) -> tuple[str, SampleSource | None]:
    """The sample's id as its file (from the dataset's ``sample_source``), else ``split[index]``."""
    try:
        source = sample_source_of(dataset, index)
    except DataError:
        source = None
    return (source.id if source is not None else f"{split}[{index}]"), source


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
        split_stats = stats[split] = SplitStats(tasks={n: TaskStats(names=class_names(t)) for n, t in tasks.items()})
        total = len(dataset)  # type: ignore[arg-type]  # map-style datasets define __len__
        absent: set[str] = set()
        for index in range(total):
            try:
                split_stats.samples += 1
                sample_id, source = _sample_name(dataset, split, index)

                try:
                    item = dataset[index]
                except DataError as error:
                    split_stats.unreadable += 1
                    split_stats.bad += 1
                    kind = getattr(error, "kind", "unreadable")
                    findings.append(Finding("error", kind, split, sample_id, None, str(error)))
                    continue
                sample_id = str(item.get("id", sample_id))
                problems = sample_problems(item, tasks, split, source)
                rejected = {name for _, name, _ in problems}
                for kind, name, message in problems:
                    findings.append(Finding("error", kind, split, sample_id, name, message))
                if problems:
                    split_stats.bad += 1
                if any(kind == "bad_image" for kind, _, _ in problems):
                    continue
                digest = image_digest(item["image"])
                if digest in seen:
                    other_split, other_id = seen[digest]
                    severity: Severity = "error" if other_split != split else "warning"
                    findings.append(
                        Finding(
                            severity, "duplicate", split, sample_id, None, f"same image as {other_split}/{other_id}"
                        )
                    )
                else:
                    seen[digest] = (split, sample_id)
                for name, task in tasks.items():
                    task_stats = split_stats.tasks[name]
                    if name not in item["targets"]:
                        if name not in absent:
                            absent.add(name)
                            findings.append(
                                Finding(
                                    "error",
                                    "no_target",
                                    split,
                                    sample_id,
                                    name,
                                    f"the dataset gives no target for task {name!r}",
                                )
                            )
                        task_stats.missing += 1
                    elif not item["valid"].get(name, False):
                        task_stats.missing += 1
                    elif name in rejected:
                        task_stats.rejected += 1
                    else:
                        task_stats.labelled += 1
                        INSPECTORS[task.target_kind](task, item["targets"][name], task_stats)
            finally:
                if progress is not None:
                    progress(split, index + 1, total)
    return DataReport(stats, findings)
