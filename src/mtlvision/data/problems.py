"""What is wrong with one loaded sample: the one judgement shared by ``data check`` and training.

:func:`sample_problems` is called on every sample by :func:`mtlvision.data.check.check_dataset` and by
:class:`mtlvision.data.guard.CheckedSamples` as training reads it, so that a sample the report calls bad is
exactly one that training refuses (or skips and counts under ``data.skip_bad``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mtlvision.data.datasets.base import SampleSource
from mtlvision.errors import DataError
from mtlvision.tasks.base import TargetKind, Task

Problem = tuple[str, str]
"""(kind, message)"""


# ------------------------------------------------------------------------------ problems of one target
def _size(task: Task, target: Any, image_size: tuple[int, int]) -> list[Problem]:
    if tuple(target.shape[-2:]) != image_size:
        message = (
            f"task {task.name!r}: the target is {tuple(target.shape[-2:])} but the image is {image_size} "
            "(H, W); a target must have its image's size (it is never resized to fit)"
        )
        return [("size_mismatch", message)]
    return []


def _outside(task: Task, target: Any, image_size: tuple[int, int]) -> list[Problem]:
    boxes = target["boxes"]
    height, width = image_size
    bad = (
        (boxes[:, 2] <= boxes[:, 0])
        | (boxes[:, 3] <= boxes[:, 1])
        | (boxes[:, :2] < 0).any(1)
        | (boxes[:, 2] > width)
        | (boxes[:, 3] > height)
    )
    if bad.any():
        message = (
            f"task {task.name!r}: {int(bad.sum())} box(es) empty or outside the {width}x{height} image, e.g. "
            f"{[round(v, 1) for v in boxes[bad][0].tolist()]}"
        )
        return [("box_outside", message)]
    return []


def _invalid_depth(task: Task, target: Any) -> list[Problem]:
    if not isinstance(target, Tensor) or not target.is_floating_point():
        return []
    nonfinite = int((~torch.isfinite(target)).sum())
    negative = int((target < 0).sum())
    if nonfinite or negative:
        message = (
            f"task {task.name!r}: {nonfinite} NaN/infinite and {negative} negative depth values (mark "
            "missing depth with 0)"
        )
        return [("invalid_depth", message)]
    return []


def _keypoints_outside(task: Task, target: Any, image_size: tuple[int, int]) -> list[Problem]:
    found = _outside(task, target, image_size)
    height, width = image_size
    points = target["keypoints"]
    labelled = points[..., 2] > 0
    x, y = points[..., 0], points[..., 1]
    bad = labelled & ((x < 0) | (x > width) | (y < 0) | (y > height))
    if bad.any():
        instance, keypoint = (int(i) for i in torch.nonzero(bad)[0])
        where = [round(v, 1) for v in points[instance, keypoint, :2].tolist()]
        found.append(
            (
                "point_outside",
                f"task {task.name!r}: {int(bad.sum())} labelled keypoint(s) outside the {width}x{height} image, e.g. "
                f"instance {instance} keypoint {keypoint} at {where}",
            )
        )
    return found


PRECHECKS: dict[TargetKind, Callable[[Task, Any], list[Problem]]] = {TargetKind.DEPTH: _invalid_depth}
"""Kind-specific problems reported under their own name before the task's ``check_target`` runs."""

SHAPE_CHECKS: dict[TargetKind, Callable[[Task, Any, tuple[int, int]], list[Problem]]] = {
    TargetKind.MASK: _size,
    TargetKind.EDGES: _size,
    TargetKind.DEPTH: _size,
    TargetKind.NORMALS: _size,
    TargetKind.BOXES: _outside,
    TargetKind.KEYPOINTS: _keypoints_outside,
}
"""Per target kind: how a target that the task accepts must fit its image."""


def target_problems(task: Task, target: Any, where: str, image_size: tuple[int, int]) -> list[Problem]:
    """The problems of one labelled target of an image of ``image_size`` (H, W); each message starts with
    ``where`` (the label file, or the split and sample id), then names the task."""
    early = PRECHECKS.get(task.target_kind, lambda *_: [])(task, target)
    if not early:
        try:
            task.check_target(target, where)
        except DataError as error:
            return [("invalid_label", str(error))]
    found = early or SHAPE_CHECKS.get(task.target_kind, lambda *_: [])(task, target, image_size)
    return [(kind, f"{where}: {message}") for kind, message in found]


def _image_problem(image: Any) -> str | None:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        return f"the image must be a float [3, H, W] tensor, got {shape}"
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        return "the image holds values outside [0, 1] or non-finite values"
    return None


def sample_problems(
    item: Mapping[str, Any], tasks: Mapping[str, Task], split: str, source: SampleSource | None = None
) -> list[tuple[str, str | None, str]]:
    """Every problem of one loaded sample as ``(kind, task or None, message)``: its image, then each labelled
    target of ``tasks`` (targets of tasks the sample lacks are left to the dataset-level ``no_target``).
    Messages name the label file when ``source`` knows it, else the split and sample id."""
    problem = _image_problem(item["image"])
    if problem:
        image = source.image if source is not None and source.image is not None else f"{split}/{item.get('id')}"
        return [("bad_image", None, f"{image}: {problem}")]
    image_size = (int(item["image"].shape[-2]), int(item["image"].shape[-1]))
    found: list[tuple[str, str | None, str]] = []
    for name, task in tasks.items():
        if name not in item["targets"] or not item["valid"].get(name, False):
            continue
        label_file = source.label_files.get(name) if source is not None else None
        where = str(label_file) if label_file is not None else f"{split}/{item.get('id')}"
        found += [
            (kind, name, message) for kind, message in target_problems(task, item["targets"][name], where, image_size)
        ]
    return found
