"""``cityscapes``: Cityscapes in the preprocessed ``.npy`` layout of MTAN and LibMTL.

The layout (read from ``create_dataset.py`` of lorenmt/mtan and LibMTL's ``examples/cityscapes``)::

    {root}/{train,val}/image/{i}.npy      float32 128 x 256 x 3, RGB in [0, 1]   (2975 train, 500 val)
    {root}/{train,val}/label_7/{i}.npy    float   128 x 256, classes 0..6, -1 = unlabelled   (mtan)
    {root}/{train,val}/label_19/{i}.npy   the same with the 19 standard classes            (mtan)
    {root}/{train,val}/label/{i}.npy      LibMTL's copy of the 7-class labels
    {root}/{train,val}/depth/{i}.npy      float   128 x 256 x 1, 0 = no measurement

The label folder is ``label_dir`` when set, else ``label_{num_classes}`` when it exists, else ``label``. The
``depth`` maps are used as stored (MTAN preprocessed them from Cityscapes' disparity maps); the joint
transforms divide them by the zoom like NYUv2's depth, as MTAN's own augmentation does.

Splits as for ``nyuv2``: ``test`` is the published ``val``; our ``val`` is carved out of ``train``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from mtlvision.data.datasets._files import mask_from_labels, require_root
from mtlvision.data.datasets.base import DATASETS, DatasetParams, DatasetSource, TaskSpec
from mtlvision.data.datasets.nyuv2 import NpyBenchmark, NpyBenchmarkParams, npy_split, read_depth
from mtlvision.errors import DataError


class CityscapesParams(NpyBenchmarkParams):
    """``data.*`` keys of ``cityscapes``."""

    num_classes: Literal[7, 19] = Field(7, description="7 coarse categories (MTAN, LibMTL) or the 19 classes")
    label_dir: str | None = Field(None, description="label sub-folder; default label_{num_classes} or label")


@DATASETS.register("cityscapes", "Cityscapes (.npy layout of MTAN/LibMTL): 7- or 19-class segmentation, depth.")
class Cityscapes(DatasetSource):
    """Cityscapes in the mtan ``.npy`` layout (see the module docstring)."""

    Params: ClassVar[type[DatasetParams]] = CityscapesParams
    LAYOUT = "{root}/{train,val}/{image,label_7 or label_19 or label,depth}/{i}.npy"

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        assert isinstance(params, CityscapesParams)
        return {
            "segmentation": TaskSpec("segmentation", {"num_classes": params.num_classes, "ignore_index": 255}),
            "depth": TaskSpec("depth"),
        }

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> NpyBenchmark:
        assert isinstance(params, CityscapesParams)
        root = require_root(params, cls.LAYOUT)
        label_dir = params.label_dir
        if label_dir is None:
            label_dir = (
                f"label_{params.num_classes}" if (root / "train" / f"label_{params.num_classes}").is_dir() else "label"
            )
        if not (root / "train" / label_dir).is_dir():
            raise DataError(f"{root / 'train' / label_dir}: label folder not found (data.label_dir).")
        readers = {"segmentation": (label_dir, mask_from_labels), "depth": ("depth", read_depth)}
        return npy_split(root, params, split, readers)
