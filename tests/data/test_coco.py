"""COCO-format loading from tiny files written by the test: boxes, class maps, crowd, errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from mtlvision.data.datasets.base import DATASETS
from mtlvision.data.datasets.coco import Coco, CocoParams
from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks.detection import Detection
from mtlvision.tasks.segmentation import Segmentation

CATEGORIES = [{"id": 11, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}]  # labels: car, dog, kite


def rectangle(x1: float, y1: float, x2: float, y2: float) -> list[list[float]]:
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def compressed_rle(height: int, width: int, rows: slice, cols: slice) -> dict:
    area = np.zeros((height, width), dtype=np.uint8, order="F")
    area[rows, cols] = 1
    rle = coco_mask.encode(area)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(height: int, width: int, rows: slice, cols: slice) -> dict:
    area = np.zeros((height, width), dtype=np.uint8)
    area[rows, cols] = 1
    flat = area.flatten(order="F")  # COCO runs go down the columns, starting with a run of zeros
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [height, width], "counts": counts}


def write_dataset(root: Path, split: str = "train") -> dict:
    images_dir = root / "images" / split
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = [
        {"id": 1, "file_name": "a.png", "width": 32, "height": 32},
        {"id": 2, "file_name": "b.png", "width": 32, "height": 32},
        {"id": 5, "file_name": "empty.png", "width": 32, "height": 32},
    ]
    for record in images:
        pixels = rng.integers(0, 255, size=(record["height"], record["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / record["file_name"])
    annotations = [
        # image 1: a large car, a small dog on top of it, and a crowd of kites
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [2, 2, 20, 16],
            "area": 320,
            "iscrowd": 0,
            "segmentation": rectangle(2, 2, 22, 18),
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 7,
            "bbox": [8, 6, 6, 5],
            "area": 30,
            "iscrowd": 0,
            "segmentation": compressed_rle(32, 32, slice(6, 11), slice(8, 14)),
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 11,
            "bbox": [20, 20, 10, 10],
            "area": 100,
            "iscrowd": 1,
            "segmentation": uncompressed_rle(32, 32, slice(20, 30), slice(20, 30)),
        },
        # image 2: a kite from uncompressed RLE on a non-crowd object
        {
            "id": 4,
            "image_id": 2,
            "category_id": 11,
            "bbox": [4, 10, 12, 8],
            "area": 96,
            "iscrowd": 0,
            "segmentation": uncompressed_rle(32, 32, slice(10, 18), slice(4, 16)),
        },
    ]
    content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return content


def params(root: Path, **overrides) -> CocoParams:
    return CocoParams(name="coco", root=str(root), **{"image_size": 32, **overrides})


def by_id(dataset) -> dict:
    return {dataset[i]["id"]: dataset[i] for i in range(len(dataset))}


def test_tasks_map_category_ids_to_contiguous_labels(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    specs = Coco.tasks(params(tmp_path))
    assert DATASETS.get("coco") is Coco
    assert specs["detection"].kind == "detection"
    assert specs["detection"].params == {"num_classes": 3, "class_names": ["car", "dog", "kite"]}
    assert specs["segmentation"].params["class_names"] == ["background", "car", "dog", "kite"]
    Segmentation("segmentation", **specs["segmentation"].params)  # the spec builds the task


def test_boxes_convert_xywh_and_leave_crowd_out(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    samples = by_id(Coco.build(params(tmp_path), "train"))
    first = samples["a.png"]["targets"]["detection"]
    assert first["boxes"].tolist() == [[2, 2, 22, 18], [8, 6, 14, 11]]
    assert first["labels"].tolist() == [0, 1]  # car, dog; the kite crowd is not a target
    assert samples["b.png"]["targets"]["detection"]["labels"].tolist() == [2]
    empty = samples["empty.png"]["targets"]["detection"]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    task = Detection("detection", 3)
    for sample in samples.values():
        assert sample["image"].shape == (3, 32, 32) and 0 <= sample["image"].min() <= sample["image"].max() <= 1
        task.check_target(sample["targets"]["detection"], sample["id"], image_size=(32, 32))


def test_class_map_matches_pycocotools_masks_with_crowd_ignored(tmp_path: Path) -> None:
    content = write_dataset(tmp_path)
    samples = by_id(Coco.build(params(tmp_path), "train"))
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(tmp_path / "annotations" / "instances_train.json"))
    masks = {a["id"]: reference.annToMask(a).astype(bool) for a in content["annotations"]}
    expected = np.zeros((32, 32), dtype=np.int64)
    expected[masks[3]] = 255
    expected[masks[1]] = 1  # car
    expected[masks[2]] = 2  # dog, smaller, painted over the car
    mask = samples["a.png"]["targets"]["segmentation"]
    assert mask.dtype == torch.int64 and np.array_equal(mask.numpy(), expected)
    assert (mask == 2).sum() == 30 and (mask == 255).sum() == 100
    second = samples["b.png"]["targets"]["segmentation"].numpy()
    assert np.array_equal(second == 3, masks[4]) and set(np.unique(second)) == {0, 3}
    assert (samples["empty.png"]["targets"]["segmentation"] == 0).all()
    assert all(s["valid"] == {"detection": True, "segmentation": True} for s in samples.values())


def test_resize_scales_boxes_and_masks(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    sample = by_id(Coco.build(params(tmp_path, image_size=(16, 24)), "train"))["a.png"]
    assert sample["image"].shape == (3, 16, 24)
    assert sample["targets"]["detection"]["boxes"].tolist() == [[1.5, 1.0, 16.5, 9.0], [6.0, 3.0, 10.5, 5.5]]
    mask = sample["targets"]["segmentation"]
    assert mask.shape == (16, 24) and (mask == 1).any() and (mask == 2).any()


def test_annotation_without_polygon_leaves_the_mask_unlabelled(tmp_path: Path) -> None:
    content = write_dataset(tmp_path)
    del content["annotations"][3]["segmentation"]
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(content))
    sample = by_id(Coco.build(params(tmp_path), "train"))["b.png"]
    assert sample["valid"] == {"detection": True, "segmentation": False}
    assert (sample["targets"]["segmentation"] == 255).all()


def test_missing_and_broken_files_are_named(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    with pytest.raises(DataError, match="instances_val.json"):
        Coco.build(params(tmp_path), "val")
    (tmp_path / "images" / "train" / "b.png").unlink()
    with pytest.raises(DataError, match="b.png"):
        Coco.build(params(tmp_path), "train")
    (tmp_path / "images" / "train" / "b.png").write_bytes(b"not a png")
    dataset = Coco.build(params(tmp_path), "train")
    with pytest.raises(DataError, match="b.png"):
        dataset[[r["file_name"] for r in dataset.images].index("b.png")]
    with pytest.raises(ConfigError, match="data.root"):
        Coco.tasks(CocoParams(name="coco"))


def test_unknown_category_and_bad_bbox_are_data_errors(tmp_path: Path) -> None:
    content = write_dataset(tmp_path)
    content["annotations"][0]["category_id"] = 99
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match="category_id 99"):
        Coco.build(params(tmp_path), "train")
    content["annotations"][0]["category_id"] = 3
    content["annotations"][0]["bbox"] = [1, 2, "wide", 4]
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match="annotation 1"):
        Coco.build(params(tmp_path), "train")
