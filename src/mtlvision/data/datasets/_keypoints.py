"""Reading keypoint annotations (COCO's ``keypoints`` lists and the folder format's per-image JSON), checked with
the file named: ``[x1, y1, v1, x2, y2, v2, ...]`` with one triple per keypoint, v as COCO (0 unlabelled, 1 labelled
but hidden, 2 visible), and a ``bbox`` ``[x, y, w, h]`` with positive sides."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlvision.errors import DataError


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def parse_instance(keypoints: Any, bbox: Any, num_keypoints: int, where: str) -> tuple[np.ndarray, list[float]]:
    """Keypoints ``[K, 3]`` (unlabelled ones zeroed, as COCO stores them) and the box ``[x1, y1, x2, y2]`` of one
    instance; :class:`DataError` starting with ``where`` when malformed."""
    if not _numbers(keypoints) or len(keypoints) != 3 * num_keypoints:
        shown = f"{len(keypoints)} values" if isinstance(keypoints, list) else repr(keypoints)[:40]
        raise DataError(
            f"{where}: keypoints must be {3 * num_keypoints} finite numbers (x, y, v for each of {num_keypoints} "
            f"keypoints), got {shown}"
        )
    points = np.asarray(keypoints, dtype=np.float32).reshape(num_keypoints, 3)
    bad = sorted({float(v) for v in points[:, 2]} - {0.0, 1.0, 2.0})
    if bad:
        raise DataError(f"{where}: keypoint visibility must be 0, 1 or 2, got {bad[:5]}")
    if not _numbers(bbox) or len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
        raise DataError(f"{where}: bbox must be [x, y, w, h] with w > 0 and h > 0, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return points * (points[:, 2:] > 0), [x, y, x + w, y + h]


def keypoint_target(instances: Sequence[tuple[np.ndarray, list[float]]], num_keypoints: int) -> dict[str, torch.Tensor]:
    """The task target ``{"keypoints": [N, K, 3], "boxes": [N, 4]}`` of parsed instances."""
    points = np.stack([p for p, _ in instances]) if instances else np.zeros((0, num_keypoints, 3), np.float32)
    return {
        "keypoints": torch.from_numpy(points.astype(np.float32)),
        "boxes": torch.tensor([b for _, b in instances], dtype=torch.float32).reshape(-1, 4),
    }


def flip_pairs_by_name(names: Sequence[str]) -> list[list[str]]:
    """Pairs of keypoint names that differ only in ``left`` and ``right`` (``left_eye``/``right_eye``, as COCO
    names them): a horizontal flip swaps them."""
    pairs = []
    for name in names:
        if "left" in name:
            partner = name.replace("left", "right")
            if partner in names and partner != name:
                pairs.append([name, partner])
    return pairs


def read_keypoint_file(path: Path, num_keypoints: int) -> dict[str, torch.Tensor]:
    """The target stored in a folder dataset's per-image JSON ``{"instances": [{"keypoints": [...], "bbox": [x, y,
    w, h]}, ...]}``; :class:`DataError` naming the file (and instance) when it is malformed."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the keypoints JSON ({exc}).") from None
    instances = content.get("instances") if isinstance(content, dict) else None
    if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
        raise DataError(f'{path}: expected {{"instances": [{{"keypoints": [...], "bbox": [x, y, w, h]}}, ...]}}.')
    parsed = [
        parse_instance(i.get("keypoints"), i.get("bbox"), num_keypoints, f"{path}, instance {n}")
        for n, i in enumerate(instances)
    ]
    return keypoint_target(parsed, num_keypoints)
