"""The generic ``folder`` format: images plus per-task CSVs, mask/depth/normal folders and COCO JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision.data.datasets import DATASETS
from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS

H, W = 12, 10
KEYS = ["a/0.jpg", "a/1.jpg", "b/2.png", "3.jpg"]


def write_folder(root: Path) -> dict[str, object]:
    rng = np.random.default_rng(3)
    for key in KEYS:
        (root / "images" / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / key)
    (root / "weather.csv").write_text("file,label\na/0.jpg,rain\na/1.jpg,0\nb/2.png,\n")  # 3.jpg absent
    (root / "tags.csv").write_text("file,car,person\na/0.jpg,1,0\na/1.jpg,0,\nb/2.png,1,1\n3.jpg,0,0\n")
    for sub in ("masks/a", "depth/a", "depth/b", "normals/a", "edges/b"):
        (root / sub).mkdir(parents=True)
    mask = rng.integers(0, 4, (H, W)).astype(np.uint8)
    mask[0, 0] = 255
    Image.fromarray(mask).save(root / "masks/a/0.png")
    depth_png = rng.integers(0, 5000, (H, W)).astype(np.uint16)
    Image.fromarray(depth_png).save(root / "depth/a/1.png")
    depth_npy = rng.random((H, W)).astype(np.float32)
    np.save(root / "depth/b/2.npy", depth_npy)
    normals = np.zeros((H, W, 3), dtype=np.uint8)
    normals[..., 2] = 255  # (0, 0, 1) in the (n + 1) / 2 encoding
    normals[..., 0] = 128
    normals[..., 1] = 128
    normals[2, 3] = 0  # black = invalid
    Image.fromarray(normals).save(root / "normals/a/0.png")
    edges = (rng.random((H, W)) < 0.2).astype(np.uint8)
    edges[1, :] = 255  # an unlabelled row
    Image.fromarray(edges).save(root / "edges/b/2.png")
    coco = {
        "images": [
            {"id": 1, "file_name": "a/0.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "3.jpg", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 4, "bbox": [0, 0, 2, 2], "iscrowd": 1},
        ],
        "categories": [{"id": 4, "name": "cat"}, {"id": 9, "name": "dog"}],
    }
    (root / "boxes.json").write_text(json.dumps(coco))
    (root / "splits").mkdir()
    (root / "splits/train.txt").write_text("\n".join(KEYS) + "\n")
    (root / "splits/val.txt").write_text("3.jpg\n")
    (root / "splits/test.txt").write_text("")
    return {"mask": mask, "depth_png": depth_png, "depth_npy": depth_npy, "edges": edges}


TASK_CONFIG = {
    "weather": {"kind": "classification", "path": "weather.csv", "class_names": ["sun", "rain"]},
    "tags": {"kind": "multilabel", "path": "tags.csv"},
    "segmentation": {"kind": "segmentation", "path": "masks", "num_classes": 4},
    "depth": {"kind": "depth", "path": "depth", "depth_scale": 1000},
    "normals": {"kind": "normals", "path": "normals"},
    "objects": {"kind": "detection", "path": "boxes.json"},
    "contours": {"kind": "edges", "path": "edges"},
}


def test_every_kind_with_partial_labels(tmp_path: Path) -> None:
    raw = write_folder(tmp_path)
    source = DATASETS.get("folder")
    params = source.Params(name="folder", root=str(tmp_path), tasks=TASK_CONFIG)
    specs = source.tasks(params)
    assert specs["tags"].params["num_labels"] == 2 and specs["objects"].params["class_names"] == ["cat", "dog"]
    tasks = {n: TASKS.get(s.kind)(n, **s.params) for n, s in specs.items()}
    train = source.build(params, "train")
    items = [train[i] for i in range(len(train))]
    assert [it["id"] for it in items] == KEYS
    assert [it["valid"]["weather"] for it in items] == [True, True, False, False]
    assert [int(it["targets"]["weather"]) for it in items[:2]] == [1, 0]
    assert [it["valid"]["tags"] for it in items] == [True, False, True, True]
    assert items[2]["targets"]["tags"].tolist() == [1.0, 1.0]
    assert [it["valid"]["segmentation"] for it in items] == [True, False, False, False]
    assert np.array_equal(items[0]["targets"]["segmentation"].numpy(), raw["mask"].astype(np.int64))
    assert [it["valid"]["depth"] for it in items] == [False, True, True, False]
    assert torch.allclose(items[1]["targets"]["depth"][0], torch.from_numpy(raw["depth_png"] / 1000.0).float())
    assert torch.equal(items[2]["targets"]["depth"][0], torch.from_numpy(raw["depth_npy"]))
    n = items[0]["targets"]["normals"]
    assert n[:, 2, 3].tolist() == [0.0, 0.0, 0.0] and torch.allclose(
        n[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=0.01
    )
    assert [it["valid"]["objects"] for it in items] == [True, False, False, True]
    assert items[0]["targets"]["objects"]["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]]  # crowd box skipped
    assert items[0]["targets"]["objects"]["labels"].tolist() == [1]
    assert items[3]["targets"]["objects"]["boxes"].shape == (0, 4)
    assert specs["contours"].kind == "edges" and [it["valid"]["contours"] for it in items] == [
        False,
        False,
        True,
        False,
    ]
    assert np.array_equal(items[2]["targets"]["contours"].numpy(), raw["edges"].astype(np.int64))
    for item in items:
        assert item["image"].shape == (3, H, W)
        for name, task in tasks.items():
            target = item["targets"][name]
            if name in ("segmentation", "depth", "normals", "contours"):
                assert target.shape[-2:] == (H, W)  # placeholders too
            if item["valid"][name]:
                task.check_target(target, item["id"])
    assert len(source.build(params, "val")) == 1 and len(source.build(params, "test")) == 0


def test_random_split_without_split_lists(tmp_path: Path) -> None:
    write_folder(tmp_path)
    for path in (tmp_path / "splits").iterdir():
        path.unlink()
    (tmp_path / "splits").rmdir()
    source = DATASETS.get("folder")
    params = source.Params(
        name="folder",
        root=str(tmp_path),
        tasks={"weather": TASK_CONFIG["weather"]},
        val_fraction=0.25,
        test_fraction=0.25,
    )
    ids = {s: source.build(params, s).keys for s in ("train", "val", "test")}
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(KEYS)
    assert len(ids["val"]) == len(ids["test"]) == 1


def test_errors_name_the_file_or_key(tmp_path: Path) -> None:
    write_folder(tmp_path)
    source = DATASETS.get("folder")
    (tmp_path / "weather.csv").write_text("file,label\na/0.jpg,hail\n")
    params = source.Params(name="folder", root=str(tmp_path), tasks={"weather": TASK_CONFIG["weather"]})
    with pytest.raises(DataError, match=r"weather.csv: label 'hail' of a/0.jpg"):
        source.build(params, "train")[0]
    with pytest.raises(ConfigError, match="data.tasks.seg: set num_classes"):
        source.tasks(
            source.Params(name="folder", root=str(tmp_path), tasks={"seg": {"kind": "segmentation", "path": "masks"}})
        )
    with pytest.raises(ConfigError, match="data.tasks is empty"):
        source.tasks(source.Params(name="folder", root=str(tmp_path)))
    (tmp_path / "tags.csv").write_text("image,car\n")
    with pytest.raises(DataError, match="tags.csv: the first line must be a header"):
        source.tasks(source.Params(name="folder", root=str(tmp_path), tasks={"tags": TASK_CONFIG["tags"]}))
