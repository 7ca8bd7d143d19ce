"""``office31`` and ``officehome``: one image domain per task, each with its own images (multi-input MTL).

The list files are LibMTL's ``examples/office/data_txt`` layout: for each domain and split a text file
``{domain}_{split}.txt`` of lines ``<image path relative to data.root> <class index>``, e.g.
``amazon/images/back_pack/frame_0054.jpg 0``. By default they are read from ``{root}/data_txt/office-31``
(or ``office-home``); ``list_dir`` points elsewhere (relative to the root or absolute).

- Office-31 (Saenko et al., ECCV 2010): domains ``amazon``, ``dslr``, ``webcam``; 31 classes.
- Office-Home (Venkateswara et al., CVPR 2017): domains ``Art``, ``Clipart``, ``Product``, ``Real_World``
  (task names in lower case); 65 classes.

Each task is a ``classification`` task named after its domain. A split is a
:class:`~mtlvision.data.sampling.MultiSourceDataset` over the domains: a sample carries its own domain's
label and placeholders (``valid`` False) for the others; the trainer draws its batches with
:class:`~mtlvision.data.sampling.MultiSourceBatchSampler` as ``data.sampling`` says. Images keep their native
sizes: set ``data.augment.resize`` (the preset uses 224 x 224) so that they can be batched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch.utils.data import Dataset

from mtlvision.data.datasets._files import build_tasks, require_root, require_split, sample
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, SampleSource, TaskSpec
from mtlvision.data.io import DEFAULT_MAX_PIXELS, read_image
from mtlvision.data.paths import confined
from mtlvision.data.sampling import MultiSourceDataset, SamplingParams
from mtlvision.errors import DataError


class OfficeParams(DatasetParams):
    """``data.*`` keys of ``office31`` / ``officehome``."""

    list_dir: str | None = Field(None, description="folder of the {domain}_{split}.txt lists")
    sampling: SamplingParams = Field(default_factory=SamplingParams, description="how domains mix per step")


def read_list(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """``(relative image path, class)`` pairs of a LibMTL list file; DataError naming the line if malformed."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: list file not found (data.list_dir).") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the list file ({exc}).") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        image, _, label = line.strip().rpartition(" ")
        if not image or not label.lstrip("-").isdigit():
            raise DataError(f"{path}, line {number}: expected '<image path> <class index>', got {line!r}.")
        if not 0 <= int(label) < num_classes:
            raise DataError(f"{path}, line {number}: class {label} is outside 0..{num_classes - 1}.")
        entries.append((image.strip(), int(label)))
    if not entries:
        raise DataError(f"{path}: the list file is empty.")
    return entries


class DomainDataset(Dataset):
    """The images of one domain; each sample carries only that domain's task. ``listed_in`` is the list file
    that named the images (for messages); every image path must stay inside ``root``."""

    def __init__(
        self,
        root: Path,
        entries: list[tuple[str, int]],
        task: str,
        listed_in: Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = root
        self.entries = entries
        self.task = task
        self.listed_in = str(listed_in or root)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def sample_source(self, index: int) -> SampleSource:
        path = self.entries[index][0]
        return SampleSource(path, confined(self.root, path, self.listed_in))

    def known_targets(self, index: int) -> dict[str, Any]:
        return {self.task: torch.tensor(self.entries[index][1], dtype=torch.int64)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.entries[index]
        image = read_image(confined(self.root, path, self.listed_in), self.max_pixels)
        return sample(image, {self.task: torch.tensor(label, dtype=torch.int64)}, {self.task: True}, path)


class OfficeBase(DatasetSource):
    """Shared by Office-31 and Office-Home: a classification task per domain over its own images."""

    Params: ClassVar[type[DatasetParams]] = OfficeParams
    FOLDER: ClassVar[str]
    DOMAINS: ClassVar[tuple[str, ...]]
    NUM_CLASSES: ClassVar[int]

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        return {d.lower(): TaskSpec("classification", {"num_classes": cls.NUM_CLASSES}) for d in cls.DOMAINS}

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> MultiSourceDataset:
        assert isinstance(params, OfficeParams)
        require_split(split)
        root = require_root(params, f"the domain image folders and data_txt/{cls.FOLDER}/{{domain}}_{{split}}.txt")
        lists = root / (params.list_dir or f"data_txt/{cls.FOLDER}")
        files = {d: lists / f"{d}_{split}.txt" for d in cls.DOMAINS}
        sources = {
            d.lower(): DomainDataset(root, read_list(file, cls.NUM_CLASSES), d.lower(), file, params.max_pixels)
            for d, file in files.items()
        }
        tasks = build_tasks(cls.tasks(params))
        placeholders = {name: task.placeholder_target for name, task in tasks.items()}
        return MultiSourceDataset(sources, placeholders, params.sampling)


@DATASETS.register("office31", "Office-31 (LibMTL list files): 31-class classification, one task per domain.")
class Office31(OfficeBase):
    """Office-31: amazon, dslr, webcam."""

    FOLDER = "office-31"
    DOMAINS = ("amazon", "dslr", "webcam")
    NUM_CLASSES = 31


@DATASETS.register("officehome", "Office-Home (LibMTL list files): 65-class classification, one task per domain.")
class OfficeHome(OfficeBase):
    """Office-Home: Art, Clipart, Product, Real_World."""

    FOLDER = "office-home"
    DOMAINS = ("Art", "Clipart", "Product", "Real_World")
    NUM_CLASSES = 65
