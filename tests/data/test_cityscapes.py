"""Cityscapes in the mtan (label_7 / label_19) and LibMTL (label) ``.npy`` layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtlvision.data.datasets import DATASETS
from mtlvision.errors import DataError

H, W = 8, 16


def write_cityscapes(root: Path, label_dirs: dict[str, int], counts: dict[str, int]) -> None:
    rng = np.random.default_rng(1)
    for split, count in counts.items():
        for sub in ("image", "depth", *label_dirs):
            (root / split / sub).mkdir(parents=True)
        for i in range(count):
            np.save(root / split / "image" / f"{i}.npy", rng.random((H, W, 3)).astype(np.float32))
            depth = rng.random((H, W, 1)).astype(np.float32)
            depth[:2] = 0.0
            np.save(root / split / "depth" / f"{i}.npy", depth)
            for sub, classes in label_dirs.items():
                np.save(root / split / sub / f"{i}.npy", rng.integers(-1, classes, (H, W)).astype(np.float32))


@pytest.mark.parametrize(
    ("label_dirs", "num_classes", "used"),
    [
        ({"label_7": 7, "label_19": 19}, 19, "label_19"),
        ({"label_7": 7, "label_19": 19}, 7, "label_7"),
        ({"label": 7}, 7, "label"),
    ],
)
def test_label_folder_and_classes(tmp_path: Path, label_dirs: dict[str, int], num_classes: int, used: str) -> None:
    write_cityscapes(tmp_path, label_dirs, {"train": 6, "val": 2})
    source = DATASETS.get("cityscapes")
    params = source.Params(name="cityscapes", root=str(tmp_path), num_classes=num_classes)
    assert source.tasks(params)["segmentation"].params["num_classes"] == num_classes
    item = source.build(params, "test")[1]
    raw = np.load(tmp_path / "val" / used / "1.npy")
    seg = item["targets"]["segmentation"]
    assert np.array_equal(seg.numpy(), np.where(raw < 0, 255, raw).astype(np.int64))
    assert seg.max() <= 255 and seg[seg != 255].max() < num_classes
    depth = item["targets"]["depth"]
    assert depth.shape == (1, H, W) and (depth[0, :2] == 0).all()
    assert set(item["targets"]) == {"segmentation", "depth"}
    assert len(source.build(params, "train")) + len(source.build(params, "val")) == 6


def test_missing_label_folder_is_named(tmp_path: Path) -> None:
    write_cityscapes(tmp_path, {"label_7": 7}, {"train": 3, "val": 1})
    source = DATASETS.get("cityscapes")
    params = source.Params(name="cityscapes", root=str(tmp_path), num_classes=19)
    with pytest.raises(DataError, match="label"):
        source.build(params, "train")
    params = source.Params(name="cityscapes", root=str(tmp_path), label_dir="label_7")
    assert source.build(params, "test")[0]["image"].dtype == torch.float32
