"""NYUv2 in the mtan/LibMTL ``.npy`` layout: arrays as the published files hold them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtlvision.data.datasets import DATASETS
from mtlvision.data.datasets.nyuv2 import export_npy_layout
from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS

H, W = 12, 16


def write_nyu(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """{root}/{train,val}/{image,label,depth,normal}/{i}.npy with the published dtypes and shapes."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[dict[str, np.ndarray]]] = {}
    for split, count in counts.items():
        written[split] = []
        for sub in ("image", "label", "depth", "normal"):
            (root / split / sub).mkdir(parents=True)
        for i in range(count):
            image = rng.random((H, W, 3)).astype(np.float32)
            label = rng.integers(-1, 13, (H, W)).astype(np.float32)  # -1 = unlabelled
            depth = (rng.random((H, W, 1)) * 9 + 0.5).astype(np.float32)
            depth[0, :3] = 0.0  # no measurement
            normal = rng.normal(size=(H, W, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=2, keepdims=True)
            normal[1, :2] = 0.0  # invalid
            arrays = {"image": image, "label": label, "depth": depth, "normal": normal}
            for sub, array in arrays.items():
                np.save(root / split / sub / f"{i}.npy", array)
            written[split].append(arrays)
    return written


def source_params(root: Path, **extra: object):
    source = DATASETS.get("nyuv2")
    return source, source.Params(name="nyuv2", root=str(root), **extra)


def test_loads_published_layout_with_conversions(tmp_path: Path) -> None:
    written = write_nyu(tmp_path, {"train": 10, "val": 3})
    source, params = source_params(tmp_path, val_fraction=0.2)
    test = source.build(params, "test")
    assert len(test) == 3
    item = test[2]
    raw = written["val"][2]
    assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"], torch.from_numpy(raw["image"]).permute(2, 0, 1))
    seg = item["targets"]["segmentation"]
    assert seg.dtype == torch.int64 and seg.shape == (H, W)
    expected = raw["label"].astype(np.int64)
    expected[expected == -1] = 255
    assert np.array_equal(seg.numpy(), expected)
    assert item["targets"]["depth"].shape == (1, H, W)
    assert (item["targets"]["depth"][0, 0, :3] == 0).all()
    assert torch.allclose(item["targets"]["normals"], torch.from_numpy(raw["normal"]).permute(2, 0, 1))
    assert item["valid"] == {"segmentation": True, "depth": True, "normals": True}
    tasks = {n: TASKS.get(s.kind)(n, **s.params) for n, s in source.tasks(params).items()}
    for name, task in tasks.items():
        task.check_target(item["targets"][name], item["id"])


def test_val_is_carved_from_train_and_test_is_their_val(tmp_path: Path) -> None:
    write_nyu(tmp_path, {"train": 10, "val": 3})
    source, params = source_params(tmp_path, val_fraction=0.2, split_seed=4)
    train, val = source.build(params, "train"), source.build(params, "val")
    assert len(train) == 8 and len(val) == 2
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(10))
    assert source.build(params, "val").indices == val.indices  # seeded
    other = source.build(source.Params(name="nyuv2", root=str(tmp_path), val_fraction=0.2, split_seed=5), "val")
    assert other.indices != val.indices or len(val) == 10
    assert all(item_id.startswith("train/") for item_id in (val[0]["id"], train[0]["id"]))
    assert source.build(params, "test")[0]["id"] == "val/0"


def test_missing_files_are_named(tmp_path: Path) -> None:
    write_nyu(tmp_path, {"train": 4, "val": 2})
    (tmp_path / "val" / "depth" / "1.npy").unlink()
    source, params = source_params(tmp_path)
    with pytest.raises(DataError, match=r"val/depth/1.npy"):
        source.build(params, "test")[1]
    (tmp_path / "train" / "image" / "2.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match=r"train/image/2.npy"):
        for split in ("train", "val"):
            dataset = source.build(params, split)
            for i in range(len(dataset)):
                dataset[i]
    with pytest.raises(DataError, match="not a folder"):
        source.build(source.Params(name="nyuv2", root=str(tmp_path / "nowhere")), "train")
    with pytest.raises(ConfigError, match="data.root"):
        source.build(source.Params(name="nyuv2"), "train")


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    write_nyu(tmp_path, {"train": 2, "val": 1})
    np.save(tmp_path / "val" / "label" / "0.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    source, params = source_params(tmp_path, val_fraction=0.5)
    with pytest.raises(DataError, match="val/label/0.npy"):
        source.build(params, "test")[0]


def test_export_round_trip(tmp_path: Path) -> None:
    write_nyu(tmp_path / "a", {"train": 4, "val": 2})
    source, params = source_params(tmp_path / "a", val_fraction=0.5)
    test = source.build(params, "test")
    export_npy_layout((test[i] for i in range(len(test))), tmp_path / "b" / "val")
    export_npy_layout((test[i] for i in range(len(test))), tmp_path / "b" / "train")
    again = source.build(source.Params(name="nyuv2", root=str(tmp_path / "b"), val_fraction=0.5), "test")
    for i in range(2):
        for name in ("segmentation", "depth", "normals"):
            assert torch.allclose(
                again[i]["targets"][name].float(), test[i]["targets"][name].float(), atol=1e-6, rtol=0
            )


def test_rescaled_normals_are_renormalised_and_zero_stays_invalid(tmp_path: Path) -> None:
    written = write_nyu(tmp_path, {"train": 2, "val": 1})
    shortened = written["val"][0]["normal"] * np.linspace(0.6, 1.0, W, dtype=np.float32)[None, :, None]
    np.save(tmp_path / "val" / "normal" / "0.npy", shortened)  # as bilinear rescaling of unit vectors leaves them
    source, params = source_params(tmp_path)
    normals = source.build(params, "test")[0]["targets"]["normals"]
    lengths = normals.norm(dim=0)
    zero = torch.from_numpy(np.abs(shortened).sum(2) == 0)
    assert torch.allclose(lengths[~zero], torch.ones(()), atol=1e-5) and bool((lengths[zero] == 0).all())
    expected = torch.nn.functional.normalize(torch.from_numpy(shortened).permute(2, 0, 1), dim=0)
    assert torch.allclose(normals, expected, atol=1e-6)
    TASKS.get("normals")("normals").check_target(normals, "val/0")
