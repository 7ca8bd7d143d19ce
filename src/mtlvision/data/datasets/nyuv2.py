"""``nyuv2``: NYU Depth v2 in the preprocessed ``.npy`` layout of MTAN, Auto-Lambda and LibMTL.

The layout (Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019; read from the
``create_dataset.py`` of lorenmt/mtan, lorenmt/auto-lambda and LibMTL's ``examples/nyu``)::

    {root}/train/image/{i}.npy    float32 H x W x 3, RGB in [0, 1]     (795 samples of 288 x 384)
    {root}/train/label/{i}.npy    float   H x W, classes 0..12, -1 = unlabelled
    {root}/train/depth/{i}.npy    float   H x W x 1, metres, 0 = no measurement
    {root}/train/normal/{i}.npy   float   H x W x 3, unit vectors, 0 = no measurement
    {root}/val/...                the same, 654 samples

``i`` runs from 0 to the number of ``image/*.npy`` files minus one. We convert the layout to our sample format:
labels -1 become 255 (our ignore index), depth becomes ``[1, H, W]``, normals ``[3, H, W]`` renormalised to
unit length.

Splits: the published data has no test split; the papers report on ``val``. Here ``test`` is their ``val``
and our ``val`` (used for model selection) is carved out of their ``train`` by ``val_fraction`` with
``split_seed``, so that model selection never sees the test images.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from mtlvision.data.datasets._files import (
    carve_validation,
    dense_map,
    hwc_image,
    load_npy,
    mask_from_labels,
    require_root,
    require_split,
    sample,
)
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, SampleSource, TaskSpec
from mtlvision.errors import DataError

NYU_CLASSES = 13


class NpyBenchmarkParams(DatasetParams):
    """``data.*`` keys of the ``.npy`` benchmark layouts (NYUv2, Cityscapes)."""

    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="share of their train split used as our val; 0 trains on all of it (the Nash-MTL / FAMO "
        "protocol, with train.select=last or mean_last:N) and leaves val empty",
    )
    split_seed: int = Field(0, ge=0, description="seed of the train/val carving")


class NpyBenchmark(Dataset):
    """One split of an mtan-style ``.npy`` folder; ``readers`` maps each task to (sub-folder, reader)."""

    def __init__(self, folder: Path, indices: list[int], readers: dict[str, tuple[str, Any]], split: str) -> None:
        self.folder = folder
        self.indices = indices
        self.readers = readers
        self.split = split

    def __len__(self) -> int:
        return len(self.indices)

    def sample_source(self, index: int) -> SampleSource:
        i = self.indices[index]
        files = {task: self.folder / sub / f"{i}.npy" for task, (sub, _) in self.readers.items()}
        return SampleSource(f"{self.folder.name}/{i}", self.folder / "image" / f"{i}.npy", files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self.indices[index]
        image_path = self.folder / "image" / f"{i}.npy"
        image = hwc_image(load_npy(image_path), image_path)
        targets = {}
        for task, (sub, read) in self.readers.items():
            path = self.folder / sub / f"{i}.npy"
            targets[task] = read(load_npy(path), path)
        return sample(image, targets, dict.fromkeys(targets, True), f"{self.folder.name}/{i}")


def count_npy(folder: Path) -> int:
    """How many samples an mtan-style split folder holds (the ``image/*.npy`` files, numbered from 0)."""
    images = folder / "image"
    if not images.is_dir():
        raise DataError(f"{images}: folder not found; expected the .npy layout {{root}}/{{train,val}}/image/{{i}}.npy.")
    count = len(fnmatch.filter(os.listdir(images), "*.npy"))
    if count == 0:
        raise DataError(f"{images}: holds no .npy files.")
    missing = [i for i in range(count) if not (images / f"{i}.npy").is_file()]
    if missing:
        raise DataError(f"{images}: {count} .npy files but {missing[0]}.npy is missing; files must be numbered 0..N-1.")
    return count


def npy_split(root: Path, params: NpyBenchmarkParams, split: str, readers: dict[str, tuple[str, Any]]) -> NpyBenchmark:
    """Our ``split`` of an mtan-style layout: test = their val; train/val carved from their train."""
    require_split(split)
    if split == "test":
        folder = root / "val"
        return NpyBenchmark(folder, list(range(count_npy(folder))), readers, split)
    folder = root / "train"
    if params.val_fraction == 0:
        every = list(range(count_npy(folder)))
        return NpyBenchmark(folder, every if split == "train" else [], readers, split)
    train, val = carve_validation(count_npy(folder), params.val_fraction, params.split_seed)
    return NpyBenchmark(folder, train if split == "train" else val, readers, split)


def read_depth(array: Any, path: Path) -> Any:
    return dense_map(array, 1, path)


def read_normals(array: Any, path: Path) -> Any:
    """Normals renormalised to unit length: MTAN rescaled the published maps from 480 x 640, which shortens
    interpolated vectors; zero vectors (no measurement) stay zero."""
    normals = dense_map(array, 3, path)
    length = normals.norm(dim=0, keepdim=True)
    return torch.where(length > 1e-6, normals / length.clamp_min(1e-6), torch.zeros_like(normals))


@DATASETS.register("nyuv2", "NYUv2 (.npy layout of MTAN/LibMTL): 13-class segmentation, depth, surface normals.")
class NYUv2(DatasetSource):
    """NYUv2 in the mtan ``.npy`` layout (see the module docstring)."""

    Params: ClassVar[type[DatasetParams]] = NpyBenchmarkParams
    LAYOUT = "{root}/{train,val}/{image,label,depth,normal}/{i}.npy"

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        return {
            "segmentation": TaskSpec("segmentation", {"num_classes": NYU_CLASSES, "ignore_index": 255}),
            "depth": TaskSpec("depth"),
            "normals": TaskSpec("normals"),
        }

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> NpyBenchmark:
        assert isinstance(params, NpyBenchmarkParams)
        readers = {
            "segmentation": ("label", mask_from_labels),
            "depth": ("depth", read_depth),
            "normals": ("normal", read_normals),
        }
        return npy_split(require_root(params, cls.LAYOUT), params, split, readers)


def export_npy_layout(
    samples: Iterable[dict[str, Any]],
    folder: Path,
    segmentation: str = "segmentation",
    depth: str = "depth",
    normals: str | None = "normals",
) -> int:
    """Write samples in the mtan ``.npy`` layout under ``folder`` (one of ``{root}/train``, ``{root}/val``).

    The inverse of the loader: image H x W x 3 float32, label H x W float32 with 255 written as -1, depth
    H x W x 1, normals H x W x 3. Useful to convert one's own data, or built-in scenes, into the layout that
    the ``nyuv2`` and ``cityscapes`` presets read. Returns the number of samples written.
    """
    for sub in ("image", "label", "depth", *(("normal",) if normals is not None else ())):
        (folder / sub).mkdir(parents=True, exist_ok=True)

    def hwc(tensor: Any) -> np.ndarray:
        return tensor.permute(1, 2, 0).numpy().astype(np.float32)

    count = 0
    for i, item in enumerate(samples):
        np.save(folder / "image" / f"{i}.npy", hwc(item["image"]))
        label = item["targets"][segmentation].numpy().astype(np.float32)
        label[label == 255] = -1.0
        np.save(folder / "label" / f"{i}.npy", label)
        np.save(folder / "depth" / f"{i}.npy", hwc(item["targets"][depth]))
        if normals is not None:
            np.save(folder / "normal" / f"{i}.npy", hwc(item["targets"][normals]))
        count += 1
    return count
