"""PASCAL-Context in the MTL-survey ``PASCAL_MT`` folder layout, with partial labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtlvision.data.datasets import DATASETS

H, W = 10, 14


def write_pascal(root: Path, train: list[str], val: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    for sub in (
        "JPEGImages",
        "ImageSets/Context",
        "semseg/pascal-context",
        "semseg/VOC12",
        "normals_distill",
        "sal_distill",
    ):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Context/train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageSets/Context/val.txt").write_text("\n".join(val) + "\n")
    arrays = {}
    for i, image_id in enumerate(train + val):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / f"JPEGImages/{image_id}.jpg")
        seg = rng.integers(0, 21, (H, W)).astype(np.uint8)
        seg[0] = 255
        arrays[image_id] = seg
        Image.fromarray(seg).save(root / f"semseg/pascal-context/{image_id}.png")
        if i % 2 == 0:  # every other image has distilled normals and saliency
            normals = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            normals[1, 1] = 0  # black = invalid
            Image.fromarray(normals).save(root / f"normals_distill/{image_id}.png")
            Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(root / f"sal_distill/{image_id}.png")
    return arrays


def test_layout_partial_labels_and_splits(tmp_path: Path) -> None:
    train = [f"2008_{i:06d}" for i in range(8)]
    val = ["2010_000001", "2010_000002"]
    segs = write_pascal(tmp_path, train, val)
    source = DATASETS.get("pascal_context")
    params = source.Params(name="pascal_context", root=str(tmp_path), val_fraction=0.25)
    assert source.tasks(params)["segmentation"].params["num_classes"] == 21
    test = source.build(params, "test")
    assert [test[i]["id"] for i in range(len(test))] == val
    second, first = test[0], test[1]  # val[0] has every label, val[1] only segmentation
    assert np.array_equal(first["targets"]["segmentation"].numpy(), segs[val[1]].astype(np.int64))
    assert first["valid"] == {"segmentation": True, "normals": False, "saliency": False}
    assert second["targets"]["normals"].norm(dim=0)[1, 1] == 0
    lengths = second["targets"]["normals"].norm(dim=0)
    assert torch.allclose(lengths[lengths > 0], torch.ones_like(lengths[lengths > 0]), atol=1e-5)
    assert set(second["targets"]["saliency"].unique().tolist()) <= {0, 1}
    assert first["targets"]["normals"].shape == (3, H, W) and (first["targets"]["normals"] == 0).all()
    assert (first["targets"]["saliency"] == 255).all()  # placeholder of a missing mask
    ours = [source.build(params, s) for s in ("train", "val")]
    assert sorted(ours[0].ids + ours[1].ids) == train and len(ours[1]) == 2


def test_voc12_masks_take_precedence(tmp_path: Path) -> None:
    write_pascal(tmp_path, ["a", "b"], ["c"])
    voc = np.full((H, W), 7, dtype=np.uint8)
    Image.fromarray(voc).save(tmp_path / "semseg/VOC12/c.png")
    source = DATASETS.get("pascal_context")
    item = source.build(source.Params(name="pascal_context", root=str(tmp_path)), "test")[0]
    assert (item["targets"]["segmentation"] == 7).all()
