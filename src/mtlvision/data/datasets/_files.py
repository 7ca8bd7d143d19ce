"""Helpers shared by the loaders of published on-disk formats: roots, safe array reads, label maps, splits."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlvision.data.datasets.base import SPLITS, DatasetParams, TaskSpec
from mtlvision.data.io import DEFAULT_MAX_PIXELS, read_array
from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS, Task

IGNORE_INDEX = 255


def require_root(params: DatasetParams, layout: str) -> Path:
    """``data.root`` as an existing folder, or a ConfigError / DataError saying what the folder must hold."""
    if not params.root:
        raise ConfigError(f"data.root is not set; point it at the {params.name} folder ({layout}).")
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder; the {params.name} dataset needs {layout}.")
    return root


def require_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}; allowed: {', '.join(SPLITS)}.")


def load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array (never unpickled); DataError naming the file when missing or corrupt."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the .npy array ({exc}).") from None


def read_png_array(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The raw values of a PNG (8- or 16-bit, grey or RGB) without any colour conversion (see
    :func:`mtlvision.data.io.read_array`)."""
    return read_array(path, max_pixels)


def hwc_image(array: np.ndarray, where: Path) -> Tensor:
    """An ``H x W x 3`` array (float in [0, 1] or uint8) as a float32 ``[3, H, W]`` tensor in [0, 1]."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{where}: expected an H x W x 3 image array, got shape {array.shape}.")
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return image.float().div(255.0) if array.dtype == np.uint8 else image.float()


def mask_from_labels(array: np.ndarray, where: Path, ignore_values: tuple[int, ...] = (-1,)) -> Tensor:
    """A class map (any numeric dtype, ``H x W`` or ``H x W x 1``) as int64 with ``ignore_values`` -> 255."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{where}: expected an H x W label map, got shape {array.shape}.")
    labels = np.nan_to_num(array.astype(np.float64), nan=-1.0)
    labels = np.rint(labels).astype(np.int64)
    for value in ignore_values:
        labels[labels == value] = IGNORE_INDEX
    return torch.from_numpy(labels)


def dense_map(array: np.ndarray, channels: int, where: Path) -> Tensor:
    """An ``H x W``, ``H x W x C`` (the mtan layout) array as float32 ``[C, H, W]``."""
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] != channels:
        raise DataError(f"{where}: expected an H x W x {channels} array, got shape {array.shape}.")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1).contiguous()


def carve_validation(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(count)`` into (train, val) indices, ``val_fraction`` of them (at least one) to val.

    The draw depends on ``seed`` only, so every run with the same seed sees the same split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}.")
    if count < 2:
        raise DataError(f"cannot carve a validation split out of {count} training sample(s).")
    order = np.random.default_rng(seed).permutation(count)
    n_val = min(count - 1, max(1, round(count * val_fraction)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def build_tasks(specs: Mapping[str, TaskSpec]) -> dict[str, Task]:
    """Instantiate the tasks a dataset declares (for their placeholders and checks)."""
    return {name: TASKS.get(spec.kind)(name, **spec.params) for name, spec in specs.items()}


def sample(image: Tensor, targets: dict[str, Any], valid: dict[str, bool], sample_id: str) -> dict[str, Any]:
    """A sample dict in the format of :mod:`mtlvision.data.datasets.base`."""
    return {"image": image, "targets": targets, "valid": valid, "id": sample_id}
