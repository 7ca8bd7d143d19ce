"""``yolo``: a detection dataset in the YOLO (ultralytics / darknet) txt format.

Layout under ``data.root`` (paths configurable, ``{split}`` is replaced by train / val / test)::

    data.yaml                  names: [cat, dog, ...]   (or {0: cat, 1: dog}); optional train/val/test folders
    images/{split}/*.jpg|png   the images
    labels/{split}/<stem>.txt  one object per line: ``class cx cy w h``, centre and size normalised to [0, 1]

When ``data.yaml`` names a folder for a split (``val: images/valid``), that folder, relative to
``data.root``, holds the split's images and its labels are found by replacing the last ``images`` part of
the path by ``labels``, as ultralytics does; a folder outside ``data.root`` (absolute, or climbing out with
``..``) is refused. Blank lines are skipped; any other line that is not five
numbers, has a class outside ``names`` or coordinates outside [0, 1] is an error naming the file and line.
An image without a label file has no objects (zero boxes), as in ultralytics' convention for background
images. Images are resized to ``image_size`` and boxes follow (the coordinates are normalised); boxes are
clipped to the image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import Field
from torch import Tensor
from torch.utils.data import Dataset

from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, SampleSource, TaskSpec
from mtlvision.data.io import read_image_resized
from mtlvision.data.paths import confined
from mtlvision.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class YoloParams(DatasetParams):
    """Config keys of the ``yolo`` dataset (``data.*``)."""

    image_size: int | tuple[int, int] = Field(256, description="resize to this size (int: square; or [H, W])")
    data_yaml: str = Field("data.yaml", description="the YAML with the class names, relative to data.root")
    image_dir: str = Field("images/{split}", description="image folder when data.yaml names none for the split")


def _root(params: YoloParams) -> Path:
    if not params.root:
        raise ConfigError("data.root must point at the YOLO-format dataset folder (holding images/ and labels/)")
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder; point it at the YOLO-format dataset")
    return root


def read_data_yaml(params: YoloParams) -> dict[str, Any]:
    path = _root(params) / params.data_yaml
    if not path.is_file():
        raise DataError(f"YOLO data file {path} not found (data.data_yaml)")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise DataError(f"cannot read the YOLO data file {path}: {error}") from error
    if not isinstance(content, dict) or "names" not in content:
        raise DataError(f"{path} must be a mapping with a 'names' list of class names")
    return content


def class_names(params: YoloParams) -> list[str]:
    content = read_data_yaml(params)
    names = content["names"]
    where = _root(params) / params.data_yaml
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{where}: 'names' keys must be the class indices 0..{len(names) - 1}, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{where}: 'names' must be a non-empty list of class names, got {names!r}")
    if "nc" in content and content["nc"] != len(names):
        raise DataError(f"{where}: nc={content['nc']} but 'names' lists {len(names)} classes")
    return [str(name) for name in names]


def split_folders(params: YoloParams, split: str) -> tuple[Path, Path]:
    """The images folder of ``split`` and its labels folder."""
    root = _root(params)
    named = read_data_yaml(params).get(split)
    if named is None:
        images = root / params.image_dir.format(split=split)
    elif isinstance(named, str) and confined(root, named, f"{root / params.data_yaml}, '{split}'").is_dir():
        images = confined(root, named, str(root / params.data_yaml))
    else:
        raise DataError(
            f"{root / params.data_yaml}: '{split}: {named}' must name an image folder under {root} "
            "(image lists in txt files are not supported)"
        )
    parts = list(images.parts)
    if "images" not in parts:
        raise DataError(f"image folder {images} has no 'images' part to replace by 'labels' for its label files")
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return images, Path(*parts)


def parse_label_file(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(boxes [N, 4] normalised cx cy w h, labels [N])``; DataError naming the file and line."""
    boxes, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {number} ({line.strip()!r})"
        if len(fields) != 5:
            raise DataError(f"{where}: expected 5 values 'class cx cy w h', got {len(fields)}")
        try:
            values = [float(v) for v in fields]
        except ValueError as error:
            raise DataError(f"{where}: {error}") from error
        label, cx, cy, w, h = values
        if not (label.is_integer() and 0 <= label < num_classes):
            raise DataError(f"{where}: class {fields[0]} is not one of the {num_classes} classes 0..{num_classes - 1}")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            raise DataError(f"{where}: cx cy w h must be normalised to [0, 1] with w, h > 0")
        boxes.append([cx, cy, w, h])
        labels.append(int(label))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 16:
        raise ConfigError(f"data.image_size must be at least 16 pixels, got {size}")
    return int(height), int(width)


class YoloDataset(Dataset):
    """One split of a YOLO-format dataset: images resized to ``image_size`` and their boxes."""

    def __init__(self, params: YoloParams, split: str) -> None:
        self.names = class_names(params)
        self.size = _pair(params.image_size)
        self.max_pixels = params.max_pixels
        self.image_dir, label_dir = split_folders(params, split)
        if not self.image_dir.is_dir():
            raise DataError(f"YOLO image folder {self.image_dir} not found (split {split!r})")
        self.files = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"YOLO image folder {self.image_dir} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        empty = (np.zeros((0, 4)), np.zeros((0,), dtype=np.int64))
        label_files = [label_dir / f"{file.stem}.txt" for file in self.files]
        self.label_files = [label if label.is_file() else None for label in label_files]
        self.labels = [parse_label_file(label, len(self.names)) if label else empty for label in self.label_files]

    def __len__(self) -> int:
        return len(self.files)

    def sample_source(self, index: int) -> SampleSource:
        label = self.label_files[index]
        return SampleSource(self.files[index].name, self.files[index], {"detection": label} if label else {})

    def __getitem__(self, index: int) -> dict[str, Any]:
        file = self.files[index]
        image, _ = read_image_resized(file, self.size, self.max_pixels)
        return {
            "image": image,
            "targets": {"detection": self._boxes(index)},
            "valid": {"detection": True},
            "id": file.name,
        }

    def _boxes(self, index: int) -> dict[str, Tensor]:
        normalised, labels = self.labels[index]
        height, width = self.size
        centre, half = normalised[:, :2], normalised[:, 2:] / 2
        scale = np.array([width, height, width, height], dtype=np.float64)
        boxes = np.concatenate([centre - half, centre + half], axis=1) * scale
        boxes = np.clip(boxes, 0, scale)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {
            "boxes": torch.from_numpy(boxes[keep].astype(np.float32)),
            "labels": torch.from_numpy(labels[keep].copy()),
        }


@DATASETS.register("yolo", description="YOLO-format txt labels (class cx cy w h) with a data.yaml of class names")
class Yolo(DatasetSource):
    """A YOLO-format detection dataset under ``data.root``."""

    Params = YoloParams

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        assert isinstance(params, YoloParams)
        names = class_names(params)
        return {"detection": TaskSpec("detection", {"num_classes": len(names), "class_names": names})}

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> YoloDataset:
        assert isinstance(params, YoloParams)
        return YoloDataset(params, split)
