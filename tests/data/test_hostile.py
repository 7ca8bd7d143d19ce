"""Hostile input in every reader that takes paths from a file: a path leading outside the dataset is refused
(naming the file that named it) and never opened; ``data.max_pixels`` refuses images before decoding; 16-bit
grey images are read at full depth by the readers that resize."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision.data.check import check_dataset
from mtlvision.data.datasets import DATASETS
from mtlvision.data.io import ImageTooLarge
from mtlvision.data.paths import UnsafePath, confined
from mtlvision.data.preflight import preflight
from mtlvision.errors import DataError
from tests.data.test_celeba import write_celeba
from tests.data.test_coco import write_dataset as write_coco
from tests.data.test_folder import TASK_CONFIG, write_folder
from tests.data.test_office import write_office31
from tests.data.test_pascal import write_pascal
from tests.data.test_yolo import write_dataset as write_yolo


def test_confined_is_lexical() -> None:
    base = Path("/data/set")
    assert confined(base, "a/../b.png", "x") == Path("/data/set/b.png")
    for bad in ("../b.png", "a/../../b.png", "/etc/passwd", "", "."):
        with pytest.raises(UnsafePath, match=r"list\.txt, line 4"):
            confined(base, bad, "list.txt, line 4")


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file PIL opens, in order."""
    seen: list[Path] = []
    original = Image.open

    def spy(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(Path(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return seen


def secret(tmp_path: Path) -> Path:
    """An image outside the dataset folder (``tmp_path / "data"``) that no reader may open."""
    path = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(path)
    return path


# Each case writes a dataset under root whose listing names the secret file, and returns (params, split,
# the listing file that must be named).
def _folder(root: Path, hostile: str) -> tuple[dict, str, str]:
    write_folder(root)
    (root / "splits/train.txt").write_text(f"a/0.jpg\n{hostile}\n")
    return {"name": "folder", "tasks": TASK_CONFIG}, "train", "train.txt, line 2"


def _office(root: Path, hostile: str) -> tuple[dict, str, str]:
    write_office31(root, {"amazon": 1, "dslr": 1, "webcam": 1})
    listing = root / "data_txt/office-31/dslr_train.txt"
    listing.write_text(listing.read_text() + f"{hostile} 3\n")
    return {"name": "office31"}, "train", "dslr_train.txt"


def _celeba(root: Path, hostile: str) -> tuple[dict, str, str]:
    write_celeba(root, [0, 0])
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    lines[0] = "3"
    lines.append(hostile + " " + " ".join(["1"] * 40))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    with open(root / "list_eval_partition.txt", "a") as handle:
        handle.write(f"{hostile} 0\n")
    return {"name": "celeba"}, "train", "list_attr_celeba.txt"


def _coco(root: Path, hostile: str) -> tuple[dict, str, str]:
    content = write_coco(root)
    content["images"].append({"id": 9, "file_name": hostile, "width": 8, "height": 8})
    (root / "annotations/instances_train.json").write_text(json.dumps(content))
    return {"name": "coco", "image_size": 16}, "train", "instances_train.json, image id 9"


def _pascal(root: Path, hostile: str) -> tuple[dict, str, str]:
    write_pascal(root, ["2008_000001", "2008_000002"], ["2010_000001"])
    hostile = hostile.removesuffix(".png")  # the list holds ids, the reader adds .jpg
    (root / "ImageSets/Context/val.txt").write_text(f"2010_000001\n{hostile}\n")
    return {"name": "pascal_context"}, "test", "val.txt"


READERS: dict[str, Callable[[Path, str], tuple[dict, str, str]]] = {
    "folder": _folder,
    "office31": _office,
    "celeba": _celeba,
    "coco": _coco,
    "pascal_context": _pascal,
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_listed_path_outside_the_dataset_is_refused_and_never_opened(
    tmp_path: Path, opened: list[Path], reader: str, kind: str
) -> None:
    target = secret(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    hostile = "../../../../secret.png" if kind == "relative" else str(target)
    keys, split, named = READERS[reader](root, hostile)
    source = DATASETS.get(keys["name"])
    params = source.Params(root=str(root), **keys)
    data = source.build(params, split)
    errors = []
    for index in range(len(data)):
        try:
            data[index]
        except DataError as error:
            errors.append(error)
    assert len(errors) == 1 and isinstance(errors[0], UnsafePath), (reader, errors)
    assert named in str(errors[0]) and "leads outside" in str(errors[0])
    assert target not in opened and target.with_suffix(".jpg") not in opened
    report = check_dataset({split: data}, {})
    assert [f.kind for f in report.errors] == ["outside_root"] and report.bad_samples == {split: 1}
    assert [f.kind for f in preflight({split: data}, {}).errors] == ["outside_root"]
    assert target not in opened


@pytest.mark.parametrize("hostile", ["../../elsewhere/images", "/tmp"])
def test_a_yolo_split_folder_outside_the_root_is_refused(tmp_path: Path, hostile: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    write_yolo(root, f"names: [cat, dog, bird]\ntrain: {hostile}\n")
    (tmp_path / "elsewhere/images").mkdir(parents=True)
    source = DATASETS.get("yolo")
    with pytest.raises(UnsafePath, match=r"data\.yaml.*leads outside"):
        source.build(source.Params(name="yolo", root=str(root), image_size=32), "train")


@pytest.mark.parametrize("reader", ["folder", "office31", "celeba", "coco", "pascal_context", "yolo"])
def test_max_pixels_refuses_images_before_decoding(tmp_path: Path, reader: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    if reader == "yolo":
        write_yolo(root)
        keys, split = {"name": "yolo", "image_size": 16}, "train"
    else:
        keys, split, _ = READERS[reader](root, {"folder": "a/0.jpg", "coco": "a.png"}.get(reader, "missing.png"))
    source = DATASETS.get(keys["name"])
    data = source.build(source.Params(root=str(root), max_pixels=40, **keys), split)
    with pytest.raises(ImageTooLarge, match=r"above data\.max_pixels = 40"):
        data[0]
    assert source.build(source.Params(root=str(root), **keys), split)[0]["image"].ndim == 3  # the default passes


def test_yolo_and_coco_read_16_bit_grey_images_at_full_depth(tmp_path: Path) -> None:
    levels = (np.arange(32 * 64, dtype=np.uint16) * 32).reshape(32, 64)
    for name in ("yolo", "coco"):
        (tmp_path / name).mkdir()
    write_yolo(tmp_path / "yolo")
    Image.fromarray(levels).save(tmp_path / "yolo/images/train/one.png")
    yolo = DATASETS.get("yolo")
    data = yolo.build(yolo.Params(name="yolo", root=str(tmp_path / "yolo"), image_size=(32, 64)), "train")
    image = next(data[i]["image"] for i in range(len(data)) if data[i]["id"] == "one.png")
    assert len(torch.unique(image)) > 1000 and float(image.max()) == pytest.approx(levels.max() / 65535, abs=1e-4)
    write_coco(tmp_path / "coco")
    Image.fromarray(levels[:, :32]).save(tmp_path / "coco/images/train/a.png")
    coco = DATASETS.get("coco")
    image = coco.build(coco.Params(name="coco", root=str(tmp_path / "coco"), image_size=32), "train")[0]["image"]
    assert len(torch.unique(image)) > 500
