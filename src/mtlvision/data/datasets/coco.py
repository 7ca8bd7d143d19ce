"""``coco``: a dataset in the COCO format, for detection, semantic segmentation and keypoints from one annotation
file.

Layout under ``data.root`` (both paths configurable, ``{split}`` is replaced by train / val / test)::

    annotations/instances_{split}.json    images, annotations (bbox, segmentation, iscrowd), categories
    images/{split}/<file_name>            the image files named in the json

Tasks, both read from the same file:

- ``detection``: the ``bbox`` of every annotation, ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``, scaled to
  ``image_size`` and clipped to the image; boxes left empty (zero width or height) are dropped. Category
  ids are mapped to contiguous labels ``0..N-1`` in increasing id order. Crowd annotations
  (``iscrowd=1``, a region of many objects) are left out of the targets, because a box cannot be matched to
  one object of a crowd. An image with no annotation has zero boxes.
- ``segmentation``: a class map rasterised from the polygons or RLE (pycocotools' mask utilities), label
  ``category index + 1`` with 0 for background. Crowd regions are ignored (255, or the first value above
  the classes when there are 255 or more) except where a non-crowd object covers them; objects are painted
  largest first so that smaller ones, often in front, stay visible. An image with a non-crowd annotation
  that has no ``segmentation`` has no mask label (``valid`` False).
- ``keypoints`` (offered when a category lists ``keypoints`` names, as COCO's ``person_keypoints_*.json`` do;
  point ``data.annotation_file`` at them): per non-crowd annotation of that category, its ``keypoints``
  ``[x, y, v] * K`` scaled with the image (unlabelled ones stay (0, 0, 0)) and its ``bbox`` as for detection;
  the category's ``skeleton`` (1-based index pairs) is drawn by ``predict``, and keypoints whose names differ
  only in ``left``/``right`` are the flip pairs. A wrong number of values, a visibility outside 0..2, a
  ``num_keypoints`` that disagrees with the visibilities or an annotation of an unknown image is a DataError
  naming the file and annotation. OKS sigmas: COCO's for its 17 person keypoints; other keypoints need the
  task's ``sigmas`` (``tasks: [{name: keypoints, sigmas: [...]}]``).

A ``file_name`` that leads outside ``image_dir`` (absolute, or climbing out with ``..``) is refused when the
sample is read (UnsafePath naming the annotation file), and the file is never opened.

Every image is resized to ``image_size`` (fixed, like the built-in scenes; the aspect ratio is not kept):
bilinear for the image, nearest for the class map, boxes scaled by the same factors.

The classes are those of the first annotation file that exists among train, val and test; every split
must use only those category ids.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as coco_mask
from pydantic import Field
from torch import Tensor
from torch.utils.data import Dataset

from mtlvision.data.datasets._keypoints import flip_pairs_by_name, keypoint_target, parse_instance
from mtlvision.data.datasets.base import DATASETS, SPLITS, DatasetParams, DatasetSource, SampleSource, TaskSpec
from mtlvision.data.io import read_image_resized
from mtlvision.data.paths import UnsafePath, confined
from mtlvision.errors import ConfigError, DataError

IGNORE = 255


def ignore_value(num_categories: int) -> int:
    """The segmentation ignore value: 255, or the first value above the class range when that holds 255."""
    return max(IGNORE, num_categories + 1)


class CocoParams(DatasetParams):
    """Config keys of the ``coco`` dataset (``data.*``)."""

    image_size: int | tuple[int, int] = Field(256, description="resize to this size (int: square; or [H, W])")
    annotation_file: str = Field(
        "annotations/instances_{split}.json", description="annotation json, relative to data.root"
    )
    image_dir: str = Field("images/{split}", description="folder of the image files, relative to data.root")


@dataclass(frozen=True)
class Categories:
    """COCO category ids, in increasing order, and their names; label ``i`` is ``ids[i]``. ``keypoint_category``
    is the first category listing ``keypoints`` names (None when none does), with those names and its skeleton as
    pairs of names."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    keypoint_category: int | None = None
    keypoint_names: tuple[str, ...] = ()
    skeleton: tuple[tuple[str, str], ...] = ()

    def label_of(self) -> dict[int, int]:
        return {category_id: index for index, category_id in enumerate(self.ids)}


def _root(params: CocoParams) -> Path:
    if not params.root:
        raise ConfigError("data.root must point at the COCO-format dataset folder (holding annotations/ and images/)")
    root = Path(params.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder; point it at the COCO-format dataset")
    return root


def _annotation_path(params: CocoParams, split: str) -> Path:
    return _root(params) / params.annotation_file.format(split=split)


@lru_cache(maxsize=8)
def _read_json(path: str, modified_ns: int, size: int) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read the COCO annotation file {path}: {error}") from error
    if not isinstance(content, dict) or not {"images", "annotations", "categories"} <= set(content):
        raise DataError(f"{path} is not a COCO instances file: it needs 'images', 'annotations' and 'categories'")
    return content


def load_annotations(path: Path) -> dict[str, Any]:
    """The parsed json (cached while the file is unchanged); DataError naming the file when missing."""
    if not path.is_file():
        raise DataError(f"COCO annotation file {path} not found (data.annotation_file)")
    status = path.stat()
    return _read_json(str(path), status.st_mtime_ns, status.st_size)


def categories_of(params: CocoParams) -> Categories:
    for split in SPLITS:
        path = _annotation_path(params, split)
        if path.is_file():
            records = sorted(load_annotations(path)["categories"], key=lambda c: c["id"])
            if not records:
                raise DataError(f"{path} lists no categories")
            ids, names = tuple(int(c["id"]) for c in records), tuple(str(c["name"]) for c in records)
            with_keypoints = [c for c in records if c.get("keypoints")]
            if not with_keypoints:
                return Categories(ids, names)
            record = with_keypoints[0]
            keypoint_names = tuple(str(n) for n in record["keypoints"])
            try:
                skeleton = tuple((keypoint_names[a - 1], keypoint_names[b - 1]) for a, b in record.get("skeleton", []))
            except (TypeError, ValueError, IndexError):
                raise DataError(
                    f"{path}: category {record['id']}'s skeleton must be pairs of 1-based keypoint indices up to "
                    f"{len(keypoint_names)}, got {record.get('skeleton')!r}"
                ) from None
            return Categories(ids, names, int(record["id"]), keypoint_names, skeleton)
    tried = ", ".join(str(_annotation_path(params, s)) for s in SPLITS)
    raise DataError(f"no COCO annotation file found; tried {tried} (data.annotation_file)")


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if min(height, width) < 16:
        raise ConfigError(f"data.image_size must be at least 16 pixels, got {size}")
    return int(height), int(width)


class CocoDataset(Dataset):
    """One split of a COCO-format dataset (see the module docstring for the targets)."""

    def __init__(self, params: CocoParams, split: str) -> None:
        path = _annotation_path(params, split)
        content = load_annotations(path)
        self.categories = categories_of(params)
        self.size = _pair(params.image_size)
        self.max_pixels = params.max_pixels
        self.path = path
        self.ignore = ignore_value(len(self.categories.ids))
        self.image_dir = _root(params) / params.image_dir.format(split=split)
        label_of = self.categories.label_of()
        by_image: dict[int, list[dict[str, Any]]] = {}
        for annotation in content["annotations"]:
            category = annotation.get("category_id")
            if category not in label_of:
                raise DataError(
                    f"{path}: annotation {annotation.get('id')} has category_id {category}, which is not among "
                    f"the categories {list(self.categories.ids)}"
                )
            bbox = annotation.get("bbox")
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
            ):
                raise DataError(f"{path}: annotation {annotation.get('id')} has bbox {bbox!r}, not [x, y, w, h]")
            by_image.setdefault(annotation["image_id"], []).append(annotation)
        self.images = sorted(content["images"], key=lambda record: record["id"])
        self.annotations = [by_image.get(record["id"], []) for record in self.images]
        self.instances = self._keypoints(content, path) if self.categories.keypoint_names else None
        missing = [r["file_name"] for r in self.images if self._safe(r) and not self._file(r).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(f"{len(missing)} image file(s) named in {path} are missing from {self.image_dir}: {shown}")

    def _keypoints(self, content: dict[str, Any], path: Path) -> dict[int, list[tuple[np.ndarray, list[float]]]]:
        """Per image id, the parsed (keypoints, box) of the keypoint category's non-crowd annotations."""
        known = {record["id"] for record in content["images"]}
        count = len(self.categories.keypoint_names)
        parsed: dict[int, list[tuple[np.ndarray, list[float]]]] = {}
        for annotation in content["annotations"]:
            if annotation.get("category_id") != self.categories.keypoint_category or annotation.get("iscrowd", 0):
                continue
            where = f"{path}: annotation {annotation.get('id')}"
            if annotation.get("image_id") not in known:
                raise DataError(f"{where} names image id {annotation.get('image_id')}, which the file does not list")
            points, box = parse_instance(annotation.get("keypoints"), annotation.get("bbox"), count, where)
            labelled = int((points[:, 2] > 0).sum())
            if "num_keypoints" in annotation and annotation["num_keypoints"] != labelled:
                raise DataError(f"{where}: num_keypoints is {annotation['num_keypoints']} but {labelled} are labelled")
            parsed.setdefault(annotation["image_id"], []).append((points, box))
        return parsed

    def _file(self, record: dict[str, Any]) -> Path:
        """The image file of ``record``, confined to the image folder (UnsafePath naming the json otherwise)."""
        return confined(self.image_dir, str(record["file_name"]), f"{self.path}, image id {record.get('id')}")

    def _safe(self, record: dict[str, Any]) -> bool:
        try:
            self._file(record)
        except UnsafePath:
            return False
        return True

    def __len__(self) -> int:
        return len(self.images)

    def sample_source(self, index: int) -> SampleSource:
        record = self.images[index]
        return SampleSource(str(record["file_name"]), self._file(record))

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.images[index]
        file = self._file(record)
        image, (original_height, original_width) = read_image_resized(file, self.size, self.max_pixels)
        height, width = self.size
        annotations = self.annotations[index]
        mask = self._class_map(annotations, original_height, original_width, str(file))
        targets = {
            "detection": self._boxes(annotations, width / original_width, height / original_height),
            "segmentation": mask if mask is not None else torch.full((height, width), self.ignore, dtype=torch.int64),
        }
        valid = {"detection": True, "segmentation": mask is not None}
        if self.instances is not None:
            scale = (width / original_width, height / original_height)
            targets["keypoints"] = self._scaled_keypoints(self.instances.get(record["id"], []), scale)
            valid["keypoints"] = True
        return {"image": image, "targets": targets, "valid": valid, "id": str(record["file_name"])}

    def _scaled_keypoints(
        self, instances: list[tuple[np.ndarray, list[float]]], scale: tuple[float, float]
    ) -> dict[str, Tensor]:
        """The instances at the resized image's scale; boxes clipped, instances whose box is left empty dropped."""
        height, width = self.size
        kept = []
        for points, (x1, y1, x2, y2) in instances:
            box = [
                *np.clip([x1 * scale[0], x2 * scale[0]], 0, width),
                *np.clip([y1 * scale[1], y2 * scale[1]], 0, height),
            ]
            if box[1] > box[0] and box[3] > box[2]:
                factor = np.array([scale[0], scale[1], 1.0], dtype=np.float32)
                kept.append((points * factor, [box[0], box[2], box[1], box[3]]))
        return keypoint_target(kept, len(self.categories.keypoint_names))

    def _boxes(self, annotations: list[dict[str, Any]], scale_x: float, scale_y: float) -> dict[str, Tensor]:
        label_of = self.categories.label_of()
        height, width = self.size
        boxes, labels = [], []
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in annotation["bbox"])
            x1, x2 = np.clip([x * scale_x, (x + w) * scale_x], 0, width)
            y1, y2 = np.clip([y * scale_y, (y + h) * scale_y], 0, height)
            if x2 > x1 and y2 > y1:
                boxes.append([x1, y1, x2, y2])
                labels.append(label_of[annotation["category_id"]])
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }

    def _class_map(self, annotations: list[dict[str, Any]], height: int, width: int, where: str) -> Tensor | None:
        """The resized class map, or None when an object of the image has no segmentation."""
        if any(not a.get("segmentation") and not a.get("iscrowd", 0) for a in annotations):
            return None
        label_of = self.categories.label_of()
        full = np.zeros((height, width), dtype=np.int64)
        for annotation in annotations:
            if annotation.get("iscrowd", 0) and annotation.get("segmentation"):
                full[_rasterise(annotation, height, width, where)] = self.ignore
        objects = [a for a in annotations if not a.get("iscrowd", 0)]
        for annotation in sorted(objects, key=lambda a: -float(a.get("area", a["bbox"][2] * a["bbox"][3]))):
            full[_rasterise(annotation, height, width, where)] = label_of[annotation["category_id"]] + 1
        out_height, out_width = self.size
        # Nearest neighbour at pixel centres; written out because class ids may exceed PIL's 8-bit masks.
        rows = np.minimum(((np.arange(out_height) + 0.5) * height / out_height).astype(np.int64), height - 1)
        cols = np.minimum(((np.arange(out_width) + 0.5) * width / out_width).astype(np.int64), width - 1)
        return torch.from_numpy(full[rows][:, cols].copy())


def _rasterise(annotation: dict[str, Any], height: int, width: int, where: str) -> np.ndarray:
    """Boolean ``[H, W]`` mask of a polygon list, uncompressed RLE or compressed RLE segmentation."""
    segmentation = annotation["segmentation"]
    try:
        if isinstance(segmentation, list):
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        return coco_mask.decode(rle).astype(bool)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise DataError(
            f"{where}: annotation {annotation.get('id')} has a segmentation that is neither polygons nor RLE ({error})"
        ) from error


@DATASETS.register(
    "coco", description="COCO-format files: detection, semantic segmentation and keypoints from one annotation json"
)
class Coco(DatasetSource):
    """A COCO-format dataset under ``data.root``: detection boxes and semantic masks from one json file."""

    Params = CocoParams

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        assert isinstance(params, CocoParams)
        categories = categories_of(params)
        names = list(categories.names)
        keypoints = {
            "keypoints": TaskSpec(
                "keypoints",
                {
                    "keypoint_names": list(categories.keypoint_names),
                    "flip_pairs": flip_pairs_by_name(categories.keypoint_names),
                    "skeleton": [list(pair) for pair in categories.skeleton],
                },
            )
        }
        return {
            "detection": TaskSpec("detection", {"num_classes": len(names), "class_names": names}),
            "segmentation": TaskSpec(
                "segmentation",
                {
                    "num_classes": len(names) + 1,
                    "class_names": ["background", *names],
                    "ignore_index": ignore_value(len(names)),
                },
            ),
            **(keypoints if categories.keypoint_names else {}),
        }

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> CocoDataset:
        assert isinstance(params, CocoParams)
        return CocoDataset(params, split)
