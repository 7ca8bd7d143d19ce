"""Every task's result as JSON, at the image's own size (see :mod:`mtlvision.engine.rescale`).

Per target kind (:data:`ENCODERS`; no special case is keyed on a task's name):

- ``label``: ``label``, ``class_name``, ``score`` and ``probabilities`` (class name -> probability).
- ``labels``: ``labels`` (those above the task's threshold) and ``scores`` (label name -> probability).
- ``boxes``: ``boxes`` (x1, y1, x2, y2 in the image's pixels), ``scores``, ``labels``, ``class_names``.
- ``keypoints``: ``scores``, ``boxes``, ``keypoints`` (per instance, per keypoint ``[x, y, score]`` in the
  image's pixels) and ``keypoint_names``.
- ``mask``: ``class_histogram`` (pixels per class) and ``mask``, the class map, as ``masks`` asks:
  ``png`` (base64 grey PNG whose values are class indices, 16-bit above 256 classes), ``rle`` (row-major
  runs: ``values[i]`` repeated ``counts[i]`` times), or ``none`` (left out).
- ``depth``: ``min``, ``max`` and ``depth``, as ``maps`` asks: ``png`` (base64 16-bit grey PNG, depth =
  min + v / 65535 * (max - min)), ``raw`` (base64 little-endian float32, exact) or ``none``.
- ``normals``: ``normals`` (``H x W x 3`` unit vectors), as ``maps`` asks: ``png`` (base64 RGB PNG,
  n = v / 255 * 2 - 1), ``raw`` or ``none``.
- ``edges``: ``edge_pixels`` (pixels at probability >= 0.5) and ``probability``, as ``maps`` asks: ``png``
  (base64 16-bit grey PNG, probability = v / 65535), ``raw`` or ``none``.

A task of another kind (a user's own) has its arrays given as ``raw`` and everything else as decoded.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mtlvision.errors import ConfigError
from mtlvision.tasks.base import TargetKind, Task

MASK_FORMATS = ("png", "rle", "none")
MAP_FORMATS = ("png", "raw", "none")
VIEW_KINDS = frozenset({TargetKind.MASK, TargetKind.DEPTH, TargetKind.NORMALS, TargetKind.EDGES})
"""Kinds whose picture (``view=1``) the service draws; the page draws the others from the JSON."""


@dataclass(frozen=True)
class Formats:
    """How dense results are returned (the ``masks``, ``maps`` and ``view`` query parameters)."""

    masks: str = "png"
    maps: str = "png"
    view: bool = False

    def __post_init__(self) -> None:
        if self.masks not in MASK_FORMATS:
            raise ConfigError(f"masks={self.masks!r}: choose one of {', '.join(MASK_FORMATS)}")
        if self.maps not in MAP_FORMATS:
            raise ConfigError(f"maps={self.maps!r}: choose one of {', '.join(MAP_FORMATS)}")


def png_base64(array: np.ndarray) -> str:
    """A 2-D uint8/uint16 array (grey) or ``H x W x 3`` uint8 array (RGB) as a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def run_length(values: np.ndarray) -> dict[str, Any]:
    """Row-major runs of a 2-D array: ``values[i]`` repeated ``counts[i]`` times."""
    flat = np.asarray(values).ravel()
    if flat.size == 0:
        return {"encoding": "rle", "size": list(values.shape), "values": [], "counts": []}
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    counts = np.diff(np.r_[starts, flat.size])
    return {
        "encoding": "rle",
        "size": list(values.shape),
        "values": flat[starts].tolist(),
        "counts": counts.tolist(),
    }


def raw_float32(array: np.ndarray) -> dict[str, Any]:
    """An array as base64 little-endian float32 with its shape: exact."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return {
        "encoding": "raw",
        "dtype": "float32",
        "shape": list(data.shape),
        "data": base64.b64encode(data.tobytes()).decode(),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _label(task: Task, decoded: dict[str, Any], formats: Formats) -> dict[str, Any]:
    names = list(getattr(task, "class_names", []))
    probabilities = decoded["probabilities"]
    return {
        **decoded,
        "probabilities": {names[i] if i < len(names) else str(i): p for i, p in enumerate(probabilities)},
    }


def _as_decoded(task: Task, decoded: dict[str, Any], formats: Formats) -> dict[str, Any]:
    return dict(decoded)


def _mask(task: Task, decoded: dict[str, Any], formats: Formats) -> dict[str, Any]:
    result = {"class_histogram": decoded["class_histogram"]}
    mask = np.asarray(decoded["mask"])
    if formats.masks == "png":
        stored = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)
        result["mask"] = {"encoding": "png", "size": list(mask.shape), "data": png_base64(stored)}
    elif formats.masks == "rle":
        result["mask"] = run_length(mask)
    return result


def _depth(task: Task, decoded: np.ndarray, formats: Formats) -> dict[str, Any]:
    depth = np.asarray(decoded, dtype=np.float32)
    low, high = (float(depth.min()), float(depth.max())) if depth.size else (0.0, 0.0)
    result: dict[str, Any] = {"min": _finite(low), "max": _finite(high)}
    if formats.maps == "png":
        scale = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
        levels = np.round(np.nan_to_num(scale) * 65535).astype(np.uint16)
        result["depth"] = {"encoding": "png", "size": list(depth.shape), "data": png_base64(levels)}
    elif formats.maps == "raw":
        result["depth"] = raw_float32(depth)
    return result


def _normals(task: Task, decoded: np.ndarray, formats: Formats) -> dict[str, Any]:
    normals = np.asarray(decoded, dtype=np.float32)
    result: dict[str, Any] = {}
    if formats.maps == "png":
        colours = np.round((np.clip(normals, -1, 1) + 1) / 2 * 255).astype(np.uint8)
        result["normals"] = {"encoding": "png", "size": list(normals.shape[:2]), "data": png_base64(colours)}
    elif formats.maps == "raw":
        result["normals"] = raw_float32(normals)
    return result


def _edges(task: Task, decoded: dict[str, Any], formats: Formats) -> dict[str, Any]:
    probability = np.asarray(decoded["probability"], dtype=np.float32)
    result: dict[str, Any] = {"edge_pixels": int(decoded["edge_pixels"])}
    if formats.maps == "png":
        levels = np.round(np.clip(probability, 0.0, 1.0) * 65535).astype(np.uint16)
        result["probability"] = {"encoding": "png", "size": list(probability.shape), "data": png_base64(levels)}
    elif formats.maps == "raw":
        result["probability"] = raw_float32(probability)
    return result


def _generic(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _generic(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_generic(v) for v in value]
    if isinstance(value, np.ndarray):
        return raw_float32(value)
    if isinstance(value, np.generic):
        value = value.item()
    return _finite(value) if isinstance(value, float) else value


ENCODERS: dict[TargetKind, Callable[[Task, Any, Formats], dict[str, Any]]] = {
    TargetKind.LABEL: _label,
    TargetKind.LABELS: _as_decoded,
    TargetKind.BOXES: _as_decoded,
    TargetKind.MASK: _mask,
    TargetKind.DEPTH: _depth,
    TargetKind.NORMALS: _normals,
    TargetKind.EDGES: _edges,
    TargetKind.KEYPOINTS: _as_decoded,
}
"""Per target kind, a decoded result (at the image's size) as JSON (see the module docstring)."""


def encode_result(task: Task, decoded: Any, formats: Formats) -> Any:
    """One task's decoded result, at the image's own size, as JSON-able values."""
    encoder = ENCODERS.get(getattr(task, "target_kind", None))  # type: ignore[arg-type]  # None: a user's kind
    return _generic(decoded) if encoder is None else _generic(encoder(task, decoded, formats))
