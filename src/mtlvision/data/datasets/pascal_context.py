"""``pascal_context``: PASCAL-Context multi-task folders as distributed with the MTL survey code.

The layout is that of ``PASCAL_MT`` used by Vandenhende et al., "Multi-Task Learning for Dense Prediction
Tasks: A Survey" (TPAMI 2021), read from ``data/pascal_context.py`` of SimonVandenhende/
Multi-Task-Learning-PyTorch (itself from facebookresearch/astmt)::

    {root}/JPEGImages/{id}.jpg
    {root}/ImageSets/Context/{train,val}.txt      one image id per line
    {root}/semseg/pascal-context/{id}.png         class per pixel, 0..20 (background + 20 VOC classes),
                                                  255 = unlabelled (or semseg/VOC12/{id}.png, tried first)
    {root}/normals_distill/{id}.png               RGB, n = 2 * v / 255 - 1 (distilled normals)
    {root}/sal_distill/{id}.png                   grey saliency, thresholded at 0.5 as in the survey code

Tasks: ``segmentation`` (21 classes), ``normals`` and ``saliency`` (a 2-class segmentation). A task whose
file is absent for an image is a missing label (``valid`` False), so partial folders load.

Not read here: edges and human parts (they need the ``.mat`` files and, for parts, the part taxonomy json
of the survey code), and the survey code's masking of distilled normals by PASCAL-Context classes that
NYUv2 knows (it needs their class-mapping json): the distilled normals are used on every pixel, renormalised.

Splits: ``test`` is the published ``val``; our ``val`` is carved out of ``train`` (``val_fraction``,
``split_seed``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import Dataset

from mtlvision.data.datasets._files import (
    build_tasks,
    carve_validation,
    mask_from_labels,
    read_png_array,
    require_root,
    require_split,
    sample,
)
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, SampleSource, TaskSpec
from mtlvision.data.io import DEFAULT_MAX_PIXELS, read_image
from mtlvision.data.paths import confined
from mtlvision.errors import DataError

VOC_CLASSES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()


class PascalContextParams(DatasetParams):
    """``data.*`` keys of ``pascal_context``."""

    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of the train list used as our val")
    split_seed: int = Field(0, ge=0, description="seed of the train/val carving")


def _semseg(root: Path, image_id: str) -> Path | None:
    for folder in ("VOC12", "pascal-context"):
        path = root / "semseg" / folder / f"{image_id}.png"
        if path.is_file():
            return path
    return None


def decode_normals_png(array: np.ndarray, where: Path) -> Tensor:
    """An RGB PNG with ``v = (n + 1) / 2 * 255`` as unit vectors ``[3, H, W]``; black pixels are invalid."""
    if array.ndim != 3 or array.shape[2] < 3:
        raise DataError(f"{where}: expected an RGB normal map, got shape {array.shape}.")
    rgb = array[..., :3]
    peak = 65535.0 if rgb.dtype == np.uint16 else 255.0
    normals = torch.from_numpy(2.0 * rgb.astype(np.float32) / peak - 1.0).permute(2, 0, 1)
    length = normals.norm(dim=0, keepdim=True)
    valid = torch.from_numpy(rgb.any(axis=2))[None] & (length > 1e-3)
    return torch.where(valid, normals / length.clamp_min(1e-6), torch.zeros_like(normals))


def _in_folder(folder: str) -> Callable[[Path, str], Path | None]:
    def locate(root: Path, image_id: str) -> Path | None:
        path = root / folder / f"{image_id}.png"
        return path if path.is_file() else None

    return locate


def _decode_saliency(array: np.ndarray, where: Path) -> Tensor:
    grey = array if array.ndim == 2 else array[..., 0]
    peak = 65535.0 if grey.dtype == np.uint16 else 255.0
    return torch.from_numpy((grey.astype(np.float32) / peak > 0.5).astype(np.int64))


def _decode_semseg(array: np.ndarray, where: Path) -> Tensor:
    return mask_from_labels(array, where, ignore_values=())


TASK_FILES: dict[str, tuple[Callable[[Path, str], Path | None], Callable[[np.ndarray, Path], Tensor]]] = {
    "segmentation": (_semseg, _decode_semseg),
    "normals": (_in_folder("normals_distill"), decode_normals_png),
    "saliency": (_in_folder("sal_distill"), _decode_saliency),
}
"""Per task: where its file is for an image id (None when absent) and how its PNG is decoded."""


class PascalContextDataset(Dataset):
    """One split of ``PASCAL_MT`` (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        ids: list[str],
        placeholders: dict[str, Any],
        listed_in: Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = root
        self.ids = ids
        self.placeholders = placeholders
        self.listed_in = str(listed_in or root)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def sample_source(self, index: int) -> SampleSource:
        """The files of sample ``index``; an id leading outside ``JPEGImages/`` is refused (UnsafePath), which
        also keeps its label files (one or two folders deeper under the root) inside the root."""
        image_id = self.ids[index]
        image = confined(self.root / "JPEGImages", f"{image_id}.jpg", self.listed_in)
        labels = {task: locate(self.root, image_id) for task, (locate, _) in TASK_FILES.items()}
        return SampleSource(image_id, image, {task: path for task, path in labels.items() if path is not None})

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        source = self.sample_source(index)
        assert source.image is not None  # sample_source always names the image file
        image = read_image(source.image, self.max_pixels)
        height, width = image.shape[-2:]
        targets: dict[str, Any] = {}
        valid: dict[str, bool] = {}
        for task, (_, decode) in TASK_FILES.items():
            path = source.label_files.get(task)
            valid[task] = path is not None
            targets[task] = (
                decode(read_png_array(path, self.max_pixels), path)
                if path is not None
                else self.placeholders[task](height, width)
            )
        return sample(image, targets, valid, image_id)


@DATASETS.register("pascal_context", "PASCAL-Context (MTL-survey PASCAL_MT folders): segmentation, normals, saliency.")
class PascalContext(DatasetSource):
    """PASCAL-Context multi-task folders (see the module docstring)."""

    Params: ClassVar[type[DatasetParams]] = PascalContextParams

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        return {
            "segmentation": TaskSpec(
                "segmentation", {"num_classes": 21, "ignore_index": 255, "class_names": VOC_CLASSES}
            ),
            "normals": TaskSpec("normals"),
            "saliency": TaskSpec(
                "segmentation", {"num_classes": 2, "ignore_index": 255, "class_names": ["background", "salient"]}
            ),
        }

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> PascalContextDataset:
        assert isinstance(params, PascalContextParams)
        require_split(split)
        root = require_root(params, "JPEGImages/, ImageSets/Context/{train,val}.txt and the task folders")
        listed = "val" if split == "test" else "train"
        list_path = root / "ImageSets" / "Context" / f"{listed}.txt"
        try:
            ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise DataError(f"{list_path}: cannot read the image list ({exc}).") from None
        if split != "test":
            train, val = carve_validation(len(ids), params.val_fraction, params.split_seed)
            ids = [ids[i] for i in (train if split == "train" else val)]
        tasks = build_tasks(cls.tasks(params))
        placeholders = {n: t.placeholder_target for n, t in tasks.items()}
        return PascalContextDataset(root, ids, placeholders, list_path, params.max_pixels)
