"""``celeba``: CelebA's 40 binary face attributes from the official files (Liu et al., ICCV 2015).

The official distribution, as ``data.root``::

    {root}/img_align_celeba/000001.jpg ...      aligned and cropped faces, 178 x 218
    {root}/list_attr_celeba.txt                 line 1: the number of images; line 2: the 40 attribute
                                                names; then "000001.jpg  -1  1  1 -1 ..." (1 = has it)
    {root}/list_eval_partition.txt              "000001.jpg 0" with 0 = train, 1 = val, 2 = test

Tasks: with ``as_multilabel: false`` (default, LibMTL and MGDA style) one two-class ``classification``
task per attribute, named after the attribute in lower case (``smiling``, ``5_o_clock_shadow``); with
``as_multilabel: true`` one ``multilabel`` task ``attributes`` over all of them. ``attributes`` restricts
either to a subset. Labels -1 become 0 and 1 stays 1.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from mtlvision.data.datasets._files import require_root, require_split, sample
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, SampleSource, TaskSpec
from mtlvision.data.io import read_image
from mtlvision.data.paths import confined
from mtlvision.errors import ConfigError, DataError

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
"""The 40 attributes in the order of ``list_attr_celeba.txt``."""

PARTITIONS = {"train": 0, "val": 1, "test": 2}


class CelebAParams(DatasetParams):
    """``data.*`` keys of ``celeba``."""

    as_multilabel: bool = Field(False, description="one multilabel task instead of 40 binary tasks")
    attributes: list[str] | None = Field(None, description="a subset of the 40 attribute names")


@lru_cache(maxsize=4)
def read_attributes(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, file names, int8 [N, 40] matrix of -1/1) from ``list_attr_celeba.txt``."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the CelebA attribute file ({exc}).") from None
    if len(lines) < 2:
        raise DataError(f"{path}: expected a count line and an attribute-name line, got {len(lines)} line(s).")
    names = lines[1].split()
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise DataError(
                f"{path}, line {number}: expected a file name and {len(names)} values, got {len(fields)} fields."
            )
        try:
            values = [int(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{path}, line {number}: attribute values must be -1 or 1.") from None
        if any(v not in (-1, 1) for v in values):
            raise DataError(f"{path}, line {number}: attribute values must be -1 or 1, got {sorted(set(values))}.")
        files.append(fields[0])
        rows.append(values)
    declared = lines[0].strip()
    if declared.isdigit() and int(declared) != len(files):
        raise DataError(f"{path}: the first line announces {declared} images but {len(files)} are listed.")
    return names, files, np.asarray(rows, dtype=np.int8).reshape(len(files), len(names))


@lru_cache(maxsize=4)
def read_partition(path: str) -> dict[str, int]:
    """File name -> partition (0 train, 1 val, 2 test) from ``list_eval_partition.txt``."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the CelebA partition file ({exc}).") from None
    out = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{path}, line {number}: expected '<file> <0|1|2>', got {line!r}.")
        out[fields[0]] = int(fields[1])
    return out


def _selected(params: CelebAParams, names: list[str]) -> list[int]:
    if params.attributes is None:
        return list(range(len(names)))
    lookup = {n.lower(): i for i, n in enumerate(names)}
    unknown = [a for a in params.attributes if a.lower() not in lookup]
    if unknown:
        raise ConfigError(f"data.attributes: unknown CelebA attribute(s) {unknown}; allowed: {', '.join(names)}.")
    return [lookup[a.lower()] for a in params.attributes]


def _names(params: CelebAParams) -> list[str]:
    if params.root:
        path = Path(params.root).expanduser() / "list_attr_celeba.txt"
        if path.is_file():
            return read_attributes(str(path))[0]
    return list(ATTRIBUTES)


class CelebADataset(Dataset):
    """One split of CelebA; targets as described in the module docstring."""

    def __init__(self, params: CelebAParams, split: str) -> None:
        require_split(split)
        root = require_root(params, "img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt")
        names, files, matrix = read_attributes(str(root / "list_attr_celeba.txt"))
        partition = read_partition(str(root / "list_eval_partition.txt"))
        missing = [f for f in files if f not in partition]
        if missing:
            raise DataError(
                f"{root / 'list_eval_partition.txt'}: no partition for {len(missing)} image(s), e.g. {missing[0]}."
            )
        keep = [i for i, f in enumerate(files) if partition[f] == PARTITIONS[split]]
        self.columns = _selected(params, names)
        self.task_names = [names[c].lower() for c in self.columns]
        self.files = [files[i] for i in keep]
        self.labels = torch.from_numpy((matrix[keep][:, self.columns] > 0).astype(np.int64))
        self.image_dir = root / "img_align_celeba"
        self.listed_in = root / "list_attr_celeba.txt"
        self.as_multilabel = params.as_multilabel
        self.max_pixels = params.max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def sample_source(self, index: int) -> SampleSource:
        """The image file of sample ``index``, confined to ``img_align_celeba/`` (UnsafePath otherwise)."""
        return SampleSource(self.files[index], confined(self.image_dir, self.files[index], str(self.listed_in)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_file = self.sample_source(index).image
        assert image_file is not None  # sample_source always names the image file
        image = read_image(image_file, self.max_pixels)
        row = self.labels[index]
        if self.as_multilabel:
            targets: dict[str, Any] = {"attributes": row.float()}
        else:
            targets = {name: row[k].clone() for k, name in enumerate(self.task_names)}
        return sample(image, targets, dict.fromkeys(targets, True), self.files[index])


@DATASETS.register("celeba", "CelebA (official files): 40 binary face attributes, as 40 tasks or one multilabel.")
class CelebA(DatasetSource):
    """CelebA from its official files (see the module docstring)."""

    Params: ClassVar[type[DatasetParams]] = CelebAParams

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        assert isinstance(params, CelebAParams)
        names = _names(params)
        chosen = [names[c] for c in _selected(params, names)]
        if params.as_multilabel:
            return {"attributes": TaskSpec("multilabel", {"num_labels": len(chosen), "label_names": chosen})}
        return {
            n.lower(): TaskSpec("classification", {"num_classes": 2, "class_names": [f"not {n}", n]}) for n in chosen
        }

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> CelebADataset:
        assert isinstance(params, CelebAParams)
        return CelebADataset(params, split)
