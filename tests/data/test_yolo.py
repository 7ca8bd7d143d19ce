"""YOLO-format loading from tiny files written by the test: txt labels, data.yaml, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlvision.data.datasets.base import DATASETS
from mtlvision.data.datasets.yolo import Yolo, YoloParams
from mtlvision.errors import DataError
from mtlvision.tasks.detection import Detection


def write_dataset(root: Path, yaml_text: str = "names: [cat, dog, bird]\n") -> None:
    (root / "data.yaml").write_text(yaml_text)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("one.png", "two.jpg", "background.png"):
        Image.fromarray(rng.integers(0, 255, size=(40, 80, 3), dtype=np.uint8)).save(root / "images" / "train" / name)
    (root / "labels" / "train" / "one.txt").write_text("0 0.5 0.5 0.25 0.5\n\n2 0.125 0.25 0.25 0.5\n")
    (root / "labels" / "train" / "two.txt").write_text("1 0.95 0.5 0.2 0.2\n")  # runs past the right edge


def params(root: Path, **overrides) -> YoloParams:
    return YoloParams(name="yolo", root=str(root), **{"image_size": 32, **overrides})


def by_id(dataset) -> dict:
    return {dataset[i]["id"]: dataset[i] for i in range(len(dataset))}


def test_names_and_boxes_in_pixels(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    assert DATASETS.get("yolo") is Yolo
    assert Yolo.tasks(params(tmp_path))["detection"].params == {"num_classes": 3, "class_names": ["cat", "dog", "bird"]}
    samples = by_id(Yolo.build(params(tmp_path, image_size=(20, 40)), "train"))
    assert set(samples) == {"one.png", "two.jpg", "background.png"}
    one = samples["one.png"]["targets"]["detection"]
    assert one["boxes"].tolist() == [[15.0, 5.0, 25.0, 15.0], [0.0, 0.0, 10.0, 10.0]]
    assert one["labels"].tolist() == [0, 2]
    two = samples["two.jpg"]["targets"]["detection"]
    assert two["boxes"][0].tolist() == pytest.approx([34.0, 8.0, 40.0, 12.0])  # clipped at the right edge
    background = samples["background.png"]["targets"]["detection"]
    assert background["boxes"].shape == (0, 4) and background["labels"].shape == (0,)
    task = Detection("detection", 3)
    for sample in samples.values():
        assert sample["image"].shape == (3, 20, 40) and sample["valid"] == {"detection": True}
        task.check_target(sample["targets"]["detection"], sample["id"], image_size=(20, 40))


def test_names_as_a_mapping_and_split_folders_from_the_yaml(tmp_path: Path) -> None:
    write_dataset(tmp_path, "names: {0: cat, 1: dog, 2: bird}\ntrain: images/train\nval: images/valid\n")
    (tmp_path / "images" / "valid").mkdir()
    (tmp_path / "labels" / "valid").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "valid" / "v.png")
    (tmp_path / "labels" / "valid" / "v.txt").write_text("2 0.5 0.5 0.5 0.5\n")
    assert Yolo.tasks(params(tmp_path))["detection"].params["class_names"] == ["cat", "dog", "bird"]
    sample = Yolo.build(params(tmp_path), "val")[0]
    assert sample["id"] == "v.png" and sample["targets"]["detection"]["labels"].tolist() == [2]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", "expected 5 values"),
        ("0 0.5 0.5 0.2 wide", "could not convert"),
        ("3 0.5 0.5 0.2 0.2", "class 3"),
        ("1.5 0.5 0.5 0.2 0.2", "class 1.5"),
        ("0 0.5 0.5 1.2 0.2", r"normalised to \[0, 1\]"),
        ("0 0.5 0.5 0 0.2", "w, h > 0"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    write_dataset(tmp_path)
    (tmp_path / "labels" / "train" / "two.txt").write_text(f"1 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(DataError, match=message) as error:
        Yolo.build(params(tmp_path), "train")
    assert "two.txt, line 2" in str(error.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    with pytest.raises(DataError, match="images/test"):
        Yolo.build(params(tmp_path), "test")
    with pytest.raises(DataError, match="holds no"):
        Yolo.build(params(tmp_path), "val")
    (tmp_path / "data.yaml").unlink()
    with pytest.raises(DataError, match="data.yaml"):
        Yolo.tasks(params(tmp_path))


def test_bad_yaml_and_undecodable_image(tmp_path: Path) -> None:
    write_dataset(tmp_path, "names: [cat, dog]\nnc: 3\n")
    with pytest.raises(DataError, match="nc=3"):
        Yolo.tasks(params(tmp_path))
    (tmp_path / "data.yaml").write_text("names: [cat, dog, bird]\n")
    (tmp_path / "images" / "train" / "one.png").write_bytes(b"broken")
    dataset = Yolo.build(params(tmp_path), "train")
    with pytest.raises(DataError, match="one.png"):
        dataset[[f.name for f in dataset.files].index("one.png")]
