"""Decoded predictions moved from the network's input size to another size (the image's own, or a picture's).

The network sees every image resized to the run's input size; ``predict`` gives its outputs at the size of
the image it was given. The table :data:`RESCALE` says, per :class:`~mtlvision.tasks.base.TargetKind`, how a
decoded result is resized (no special case is keyed on a task's name):

==========  ======================================================================================
kind        decoded result, resized
==========  ======================================================================================
label(s)    unchanged (image-level)
mask        ``mask`` by nearest neighbour (source pixel ``floor(i * h / H)``); ``class_histogram``
            recounted at the new size
depth       the ``H x W`` map bilinearly
normals     each component bilinearly, then renormalised to unit length (zero vectors stay zero)
boxes       ``boxes`` (x1, y1, x2, y2) scaled by the ratio of the sizes
keypoints   ``boxes`` and the keypoints' x and y scaled by the ratio of the sizes
edges       ``probability`` bilinearly; ``edges`` (probability >= 0.5) and ``edge_pixels`` recomputed from it
==========  ======================================================================================

A task of a kind not in the table (a user's own) keeps its decoded result as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mtlvision.tasks.base import TargetKind, Task
from mtlvision.tasks.drawing import resize_bilinear, resize_nearest

Size = tuple[int, int]


def _mask(task: Task, decoded: dict[str, Any], source: Size, size: Size) -> dict[str, Any]:
    mask = resize_nearest(np.asarray(decoded["mask"]), *size)
    names = list(getattr(task, "class_names", []))
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=len(names))
    histogram = {(names[c] if c < len(names) else str(c)): int(n) for c, n in enumerate(counts) if n > 0}
    return {**decoded, "mask": mask, "class_histogram": histogram}


def _depth(task: Task, decoded: np.ndarray, source: Size, size: Size) -> np.ndarray:
    return resize_bilinear(np.asarray(decoded), *size)


def _normals(task: Task, decoded: np.ndarray, source: Size, size: Size) -> np.ndarray:
    array = np.asarray(decoded, dtype=np.float32)
    if array.shape[:2] == size:
        return array
    resized = np.stack([resize_bilinear(array[..., c], *size) for c in range(array.shape[2])], axis=-1)
    norm = np.linalg.norm(resized, axis=-1, keepdims=True)
    return np.where(norm > 1e-6, resized / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def _boxes(task: Task, decoded: dict[str, Any], source: Size, size: Size) -> dict[str, Any]:
    sy, sx = size[0] / source[0], size[1] / source[1]
    boxes = [
        [round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2)]
        for x1, y1, x2, y2 in decoded["boxes"]
    ]
    return {**decoded, "boxes": boxes}


def _keypoints(task: Task, decoded: dict[str, Any], source: Size, size: Size) -> dict[str, Any]:
    sy, sx = size[0] / source[0], size[1] / source[1]
    keypoints = [
        [[round(x * sx, 2), round(y * sy, 2), score] for x, y, score in points] for points in decoded["keypoints"]
    ]
    return {**_boxes(task, decoded, source, size), "keypoints": keypoints}


def _edges(task: Task, decoded: dict[str, Any], source: Size, size: Size) -> dict[str, Any]:
    probability = resize_bilinear(np.asarray(decoded["probability"]), *size)
    edges = (probability >= 0.5).astype(np.uint8)
    return {**decoded, "probability": probability, "edges": edges, "edge_pixels": int(edges.sum())}


def _unchanged(task: Task, decoded: Any, source: Size, size: Size) -> Any:
    return decoded


RESCALE: dict[TargetKind, Callable[[Task, Any, Size, Size], Any]] = {
    TargetKind.LABEL: _unchanged,
    TargetKind.LABELS: _unchanged,
    TargetKind.MASK: _mask,
    TargetKind.DEPTH: _depth,
    TargetKind.NORMALS: _normals,
    TargetKind.BOXES: _boxes,
    TargetKind.EDGES: _edges,
    TargetKind.KEYPOINTS: _keypoints,
}
"""Per target kind, how a decoded result is resized (see the module docstring)."""


def rescale_decoded(task: Task, decoded: Any, source: Size, size: Size) -> Any:
    """``decoded`` (one sample of ``task.decode``, for a network input of ``source`` = (H, W)) at ``size``."""
    kind = getattr(task, "target_kind", None)
    return RESCALE.get(kind, _unchanged)(task, decoded, source, size)  # type: ignore[arg-type]  # None: _unchanged
