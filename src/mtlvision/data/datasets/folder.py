"""``folder``: a user's own multi-task data as plain files, any label of any image optional.

Layout under ``data.root`` (every path below is configurable)::

    images/                     the images (.jpg .jpeg .png .bmp .tif .tiff .webp), sub-folders allowed;
                                an image's key is its path relative to images/, e.g. "street/0001.jpg"
    splits/{train,val,test}.txt optional: one image key per line; without them the images are split at
                                random (seeded) by val_fraction and test_fraction

and, per task, declared under ``data.tasks`` with its ``kind`` and ``path`` (relative to the root):

=============== =================================================================================
kind            file(s) at ``path``
=============== =================================================================================
classification  CSV with header ``file,label``; a label is a class index or one of ``class_names``
multilabel      CSV with header ``file,<label 1>,<label 2>,...``; cells 0 or 1 (the header names the labels)
segmentation    folder of PNG masks ``{path}/{key without suffix}.png``: class indices, 255 = unlabelled
depth           folder of ``{key}.png`` (16-bit, depth = value / depth_scale) or ``{key}.npy`` (float
                H x W, metres); 0 = no measurement
normals         folder of ``{key}.png`` (RGB, v = (n + 1) / 2 * 255; black = invalid) or ``{key}.npy``
                (float H x W x 3, zero vectors invalid)
detection       a COCO instances JSON whose ``file_name`` entries are image keys (boxes [x, y, w, h];
                crowd annotations skipped); read with the COCO loader's reader
edges           folder of grey PNG maps ``{path}/{key without suffix}.png``: 1 = edge, 0 = no edge,
                ``ignore_index`` (255) = unlabelled; any other value is refused
keypoints       folder of ``{path}/{key without suffix}.json``, each ``{"instances": [{"keypoints": [x1, y1,
                v1, ...], "bbox": [x, y, w, h]}, ...]}`` in pixels, one triple per name of
                ``keypoint_names`` (v: 0 unlabelled, 1 hidden, 2 visible); ``flip_pairs``, ``sigmas`` (OKS,
                one per keypoint) and ``skeleton`` beside them
=============== =================================================================================

Every path comes from a file (a split list line, a CSV row) and must stay inside its folder: a key such as
``../../secret.png`` or an absolute path is refused with a DataError naming the list and line, before
anything is read (:mod:`mtlvision.data.paths`). Images and PNG label maps above ``data.max_pixels`` are refused
before decoding; 16-bit depth PNGs keep their integer values (depth = value / depth_scale).

A label that is absent (an image missing from a CSV, an empty cell, no mask file, an image not in the JSON)
is a missing label: the sample keeps the task's placeholder with ``valid`` False, so its loss is masked and
metrics count only labelled images. Example::

    data:
      name: folder
      root: /data/street
      tasks:
        weather: {kind: classification, path: weather.csv, class_names: [sun, rain, snow]}
        segmentation: {kind: segmentation, path: masks, num_classes: 5}
        depth: {kind: depth, path: depth, depth_scale: 256}
        objects: {kind: detection, path: boxes.json}
"""

from __future__ import annotations

import csv
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from mtlvision.data.datasets._files import (
    build_tasks,
    dense_map,
    load_npy,
    mask_from_labels,
    read_png_array,
    require_root,
    require_split,
    sample,
)
from mtlvision.data.datasets._keypoints import read_keypoint_file
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, SampleSource, TaskSpec
from mtlvision.data.datasets.coco import load_annotations
from mtlvision.data.datasets.pascal_context import decode_normals_png
from mtlvision.data.io import DEFAULT_MAX_PIXELS, read_image
from mtlvision.data.paths import confined
from mtlvision.errors import ConfigError, DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class FolderTask(BaseModel):
    """One task of a ``folder`` dataset (``data.tasks.<name>``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["classification", "multilabel", "segmentation", "depth", "normals", "detection", "edges", "keypoints"]
    path: str = Field(description="CSV, folder or JSON holding the labels, relative to data.root")
    num_classes: int | None = Field(None, ge=2, description="classification (or class_names) and segmentation")
    class_names: list[str] | None = None
    ignore_index: int = 255
    depth_scale: float = Field(1000.0, gt=0, description="16-bit depth PNG value per unit of depth")
    keypoint_names: list[str] | None = Field(None, description="keypoints: one name per keypoint, in file order")
    flip_pairs: list[tuple[str, str]] = Field(default_factory=list, description="keypoints a flip swaps")
    sigmas: list[float] | None = Field(None, description="keypoints: OKS sigma per keypoint")
    skeleton: list[tuple[str, str]] = Field(default_factory=list, description="keypoints joined when drawn")


class FolderParams(DatasetParams):
    """``data.*`` keys of ``folder``."""

    image_dir: str = "images"
    split_dir: str = "splits"
    tasks: dict[str, FolderTask] = Field(default_factory=dict)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0)


# ----------------------------------------------------------------------------------- label sources by kind
class LabelSource(ABC):
    """Where one task's labels live; ``target(key)`` is the label of an image key or None when absent.

    ``in_memory`` sources (CSV, JSON) hold every label once built, so the checks read them without any file.
    """

    in_memory: ClassVar[bool] = True

    def __init__(self, root: Path, name: str, task: FolderTask, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path = root / task.path
        self.name = name
        self.task = task
        self.max_pixels = max_pixels

    @abstractmethod
    def spec(self) -> TaskSpec:
        """The task this source provides."""

    @abstractmethod
    def target(self, key: str) -> Any | None:
        """The label of image ``key`` in the task's target format, or None when it has none."""

    def _require_classes(self) -> int:
        count = self.task.num_classes or (len(self.task.class_names) if self.task.class_names else None)
        if count is None:
            raise ConfigError(f"data.tasks.{self.name}: set num_classes or class_names for a {self.task.kind} task.")
        return count


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the label CSV ({exc}).") from None
    if not rows or len(rows[0]) < 2 or rows[0][0].strip().lower() != "file":
        raise DataError(f"{path}: the first line must be a header starting with 'file', e.g. 'file,label'.")
    header = [h.strip() for h in rows[0]]
    table = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}, line {number}: {len(row)} fields for a header of {len(header)}.")
        table[row[0].strip()] = [cell.strip() for cell in row[1:]]
    return header[1:], table


class CsvLabels(LabelSource):
    """``file,label`` with class indices or names."""

    def __init__(self, root: Path, name: str, task: FolderTask, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(root, name, task, max_pixels)
        self.num_classes = self._require_classes()
        _, self.table = _read_csv(self.path)
        self.lookup = {n: i for i, n in enumerate(task.class_names or [])}

    def spec(self) -> TaskSpec:
        params: dict[str, Any] = {"num_classes": self.num_classes}
        if self.task.class_names:
            params["class_names"] = list(self.task.class_names)
        return TaskSpec("classification", params)

    def target(self, key: str) -> Any | None:
        cell = self.table.get(key, [""])[0]
        if not cell:
            return None
        if cell in self.lookup:
            return torch.tensor(self.lookup[cell])
        try:
            return torch.tensor(int(cell))
        except ValueError:
            raise DataError(
                f"{self.path}: label {cell!r} of {key} is neither a class index nor one of "
                f"class_names {list(self.lookup)}."
            ) from None


class CsvMultiLabels(LabelSource):
    """``file,<label 1>,...`` with 0/1 cells; a row with an empty cell is a missing label."""

    def __init__(self, root: Path, name: str, task: FolderTask, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(root, name, task, max_pixels)
        self.names, self.table = _read_csv(self.path)

    def spec(self) -> TaskSpec:
        return TaskSpec("multilabel", {"num_labels": len(self.names), "label_names": self.names})

    def target(self, key: str) -> Any | None:
        cells = self.table.get(key)
        if cells is None or any(not c for c in cells):
            return None
        try:
            return torch.tensor([float(c) for c in cells], dtype=torch.float32)
        except ValueError:
            raise DataError(f"{self.path}: the labels of {key} must be 0 or 1, got {cells}.") from None


class FileFolder(LabelSource):
    """One file per image in a folder, found by the image key with one of ``suffixes``."""

    suffixes: ClassVar[tuple[str, ...]] = (".png",)
    in_memory = False

    def file(self, key: str) -> Path | None:
        """The label file of image ``key`` (None when it has none); a key leading outside the folder is refused."""
        stem = Path(key).with_suffix("")
        for suffix in self.suffixes:
            path = confined(self.path, f"{stem}{suffix}", f"the {self.name} label of image {key!r}")
            if path.is_file():
                return path
        return None

    def target(self, key: str) -> Any | None:
        path = self.file(key)
        return None if path is None else self.decode(path)

    @abstractmethod
    def decode(self, path: Path) -> Any:
        """The target stored in ``path``."""


class MaskFolder(FileFolder):
    def spec(self) -> TaskSpec:
        params: dict[str, Any] = {"num_classes": self._require_classes(), "ignore_index": self.task.ignore_index}
        if self.task.class_names:
            params["class_names"] = list(self.task.class_names)
        return TaskSpec("segmentation", params)

    def decode(self, path: Path) -> Any:
        return mask_from_labels(read_png_array(path, self.max_pixels), path, ignore_values=())


class EdgeFolder(FileFolder):
    def spec(self) -> TaskSpec:
        return TaskSpec("edges", {"ignore_index": self.task.ignore_index})

    def decode(self, path: Path) -> Any:
        return mask_from_labels(read_png_array(path, self.max_pixels), path, ignore_values=())


class KeypointFolder(FileFolder):
    """One JSON file of instances per image (module docstring)."""

    suffixes = (".json",)

    def spec(self) -> TaskSpec:
        if not self.task.keypoint_names:
            raise ConfigError(f"data.tasks.{self.name}: a keypoints task needs keypoint_names (one per keypoint).")
        params: dict[str, Any] = {
            "keypoint_names": list(self.task.keypoint_names),
            "flip_pairs": [list(pair) for pair in self.task.flip_pairs],
            "skeleton": [list(pair) for pair in self.task.skeleton],
        }
        if self.task.sigmas is not None:
            params["sigmas"] = list(self.task.sigmas)
        return TaskSpec("keypoints", params)

    def decode(self, path: Path) -> Any:
        return read_keypoint_file(path, len(self.task.keypoint_names or []))


class DepthFolder(FileFolder):
    suffixes = (".png", ".npy")

    def spec(self) -> TaskSpec:
        return TaskSpec("depth")

    def decode(self, path: Path) -> Any:
        if path.suffix == ".npy":
            return dense_map(load_npy(path), 1, path)
        array = read_png_array(path, self.max_pixels)
        if array.ndim != 2:
            raise DataError(f"{path}: a depth PNG must have one channel (16-bit grey), got shape {array.shape}.")
        return torch.from_numpy(array.astype(np.float32) / self.task.depth_scale)[None]


class NormalFolder(FileFolder):
    suffixes = (".png", ".npy")

    def spec(self) -> TaskSpec:
        return TaskSpec("normals")

    def decode(self, path: Path) -> Any:
        if path.suffix == ".npy":
            return dense_map(load_npy(path), 3, path)
        return decode_normals_png(read_png_array(path, self.max_pixels), path)


class CocoBoxes(LabelSource):
    """Boxes of a COCO instances JSON, labels numbered by increasing category id."""

    def __init__(self, root: Path, name: str, task: FolderTask, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(root, name, task, max_pixels)
        content = load_annotations(self.path)
        categories = sorted(content["categories"], key=lambda c: c["id"])
        self.class_names = [str(c["name"]) for c in categories]
        label_of = {c["id"]: i for i, c in enumerate(categories)}
        file_of = {img["id"]: img["file_name"] for img in content["images"]}
        self.boxes: dict[str, list[tuple[list[float], int]]] = {f: [] for f in file_of.values()}
        for ann in content["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in label_of or ann["image_id"] not in file_of:
                raise DataError(f"{self.path}: annotation {ann.get('id')} names an unknown image or category.")
            x, y, w, h = (float(v) for v in ann["bbox"])
            self.boxes[file_of[ann["image_id"]]].append(([x, y, x + w, y + h], label_of[ann["category_id"]]))

    def spec(self) -> TaskSpec:
        return TaskSpec("detection", {"num_classes": len(self.class_names), "class_names": self.class_names})

    def target(self, key: str) -> Any | None:
        if key not in self.boxes:
            return None
        entries = self.boxes[key]
        return {
            "boxes": torch.tensor([b for b, _ in entries], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([c for _, c in entries], dtype=torch.int64),
        }


LABEL_SOURCES: dict[str, type[LabelSource]] = {
    "classification": CsvLabels,
    "multilabel": CsvMultiLabels,
    "segmentation": MaskFolder,
    "depth": DepthFolder,
    "normals": NormalFolder,
    "detection": CocoBoxes,
    "edges": EdgeFolder,
    "keypoints": KeypointFolder,
}
"""Task kind -> how its labels are stored in a ``folder`` dataset."""


def label_sources(params: FolderParams) -> dict[str, LabelSource]:
    if not params.tasks:
        raise ConfigError("data.tasks is empty: declare each task of the folder dataset with its kind and path.")
    root = require_root(params, f"{params.image_dir}/ and the label files of data.tasks")
    return {name: LABEL_SOURCES[task.kind](root, name, task, params.max_pixels) for name, task in params.tasks.items()}


def image_keys(params: FolderParams, split: str) -> list[str]:
    """The image keys of ``split``: from ``splits/{split}.txt`` or a seeded random split of ``images/``."""
    return [key for key, _ in listed_keys(params, split)]


def listed_keys(params: FolderParams, split: str) -> list[tuple[str, str]]:
    """The image keys of ``split``, each with where it comes from (the split list and line, or the folder)."""
    root = require_root(params, f"{params.image_dir}/")
    image_dir = root / params.image_dir
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found (data.image_dir).")
    listed = root / params.split_dir / f"{split}.txt"
    if (root / params.split_dir).is_dir():
        try:
            lines = listed.read_text().splitlines()
        except OSError as exc:
            raise DataError(f"{listed}: cannot read the split list ({exc}).") from None
        return [(line.strip(), f"{listed}, line {number}") for number, line in enumerate(lines, 1) if line.strip()]
    keys = sorted(
        p.relative_to(image_dir).as_posix()
        for p in image_dir.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not keys:
        raise DataError(f"{image_dir}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    order = np.random.default_rng(params.split_seed).permutation(len(keys))
    n_val, n_test = round(len(keys) * params.val_fraction), round(len(keys) * params.test_fraction)
    if n_val + n_test >= len(keys):
        raise ConfigError(f"data.val_fraction + data.test_fraction leave no training image out of {len(keys)}.")
    parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    return [(keys[i], str(image_dir)) for i in sorted(parts[split].tolist())]


class FolderDataset(Dataset):
    """One split of a ``folder`` dataset (see the module docstring); ``origins`` says where each key was read."""

    def __init__(
        self,
        image_dir: Path,
        keys: list[str],
        sources: dict[str, LabelSource],
        origins: list[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.image_dir = image_dir
        self.keys = keys
        self.origins = origins or [str(image_dir)] * len(keys)
        self.sources = sources
        self.max_pixels = max_pixels
        tasks = build_tasks({name: source.spec() for name, source in sources.items()})
        self.placeholders = {name: task.placeholder_target for name, task in tasks.items()}

    def __len__(self) -> int:
        return len(self.keys)

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``, confined to the image folder (UnsafePath naming the line)."""
        return confined(self.image_dir, self.keys[index], self.origins[index])

    def sample_source(self, index: int) -> SampleSource:
        key, image = self.keys[index], self.image_path(index)
        files = {name: source.file(key) for name, source in self.sources.items() if isinstance(source, FileFolder)}
        return SampleSource(key, image, {name: path for name, path in files.items() if path is not None})

    def known_targets(self, index: int) -> dict[str, Any]:
        """The CSV and JSON labels of sample ``index`` (no file is read)."""
        key = self.keys[index]
        found = {name: source.target(key) for name, source in self.sources.items() if source.in_memory}
        return {name: target for name, target in found.items() if target is not None}

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        image = read_image(self.image_path(index), self.max_pixels)
        height, width = image.shape[-2:]
        targets, valid = {}, {}
        for name, source in self.sources.items():
            target = source.target(key)
            valid[name] = target is not None
            targets[name] = target if target is not None else self.placeholders[name](height, width)
        return sample(image, targets, valid, key)


@DATASETS.register("folder", "Your own data: images/ plus per-task CSVs, mask/depth/normal folders, COCO JSON.")
class Folder(DatasetSource):
    """A user's folder of images and per-task labels (see the module docstring)."""

    Params: ClassVar[type[DatasetParams]] = FolderParams

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        assert isinstance(params, FolderParams)
        return {name: source.spec() for name, source in label_sources(params).items()}

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> FolderDataset:
        assert isinstance(params, FolderParams)
        require_split(split)
        sources = label_sources(params)
        root = require_root(params, f"{params.image_dir}/")
        entries = listed_keys(params, split)
        return FolderDataset(
            root / params.image_dir,
            [key for key, _ in entries],
            sources,
            [where for _, where in entries],
            params.max_pixels,
        )
