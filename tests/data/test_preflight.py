"""The cheap checks before training: the same image file in two splits (by identity or content), labels of
CSV files out of range, paths outside the dataset; no image is decoded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlvision.data.datasets import DATASETS
from mtlvision.data.preflight import preflight
from mtlvision.tasks import TASKS


def write(root: Path) -> None:
    """A folder dataset: train a b c, val d e, test f; all distinct, labels in range."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    for name in "abcdef":
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
    (root / "weather.csv").write_text("file,label\n" + "".join(f"{n}.png,{i % 3}\n" for i, n in enumerate("abcdef")))
    for split, names in {"train": "abc", "val": "de", "test": "f"}.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{n}.png\n" for n in names))


def run(root: Path):
    source = DATASETS.get("folder")
    params = source.Params(
        name="folder",
        root=str(root),
        tasks={"weather": {"kind": "classification", "path": "weather.csv", "class_names": ["sun", "rain", "snow"]}},
    )
    tasks = {n: TASKS.get(s.kind)(n, **s.params) for n, s in source.tasks(params).items()}
    return preflight({split: source.build(params, split) for split in ("train", "val", "test")}, tasks)


def test_clean_data_passes_without_decoding_an_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("an image was opened"))
    report = run(tmp_path)
    assert report.ok and not report.findings and report.bad_samples == {"train": 0, "val": 0, "test": 0}


def test_the_same_file_in_two_splits_is_a_leak(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / "splits" / "val.txt").write_text("d.png\nb.png\n")  # b is in train
    report = run(tmp_path)
    assert [(f.kind, f.split, f.sample, f.severity) for f in report.findings] == [
        ("duplicate", "val", "b.png", "error")
    ]
    assert "same image file as train/b.png" in report.findings[0].message and "leak" in report.findings[0].message


def test_a_copy_or_a_link_is_the_same_image(tmp_path: Path) -> None:
    write(tmp_path)
    shutil.copy(tmp_path / "images" / "a.png", tmp_path / "images" / "copy.png")
    os.link(tmp_path / "images" / "c.png", tmp_path / "images" / "hard.png")
    (tmp_path / "images" / "soft.png").symlink_to(tmp_path / "images" / "f.png")
    (tmp_path / "splits" / "val.txt").write_text("d.png\ncopy.png\nhard.png\n")
    (tmp_path / "splits" / "train.txt").write_text("a.png\nb.png\nc.png\nsoft.png\n")
    findings = sorted((f.split, f.sample, f.severity, f.message.split(" train/")[0]) for f in run(tmp_path).findings)
    assert [f[:3] for f in findings] == [
        ("test", "f.png", "error"),
        ("val", "copy.png", "error"),
        ("val", "hard.png", "error"),
    ]
    assert "identical copy" in findings[1][3] and "same image file" in findings[2][3]


def test_a_duplicate_within_a_split_is_a_warning(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / "splits" / "train.txt").write_text("a.png\nb.png\na.png\n")
    report = run(tmp_path)
    assert report.ok and [(f.kind, f.severity) for f in report.findings] == [("duplicate", "warning")]


def test_csv_labels_out_of_range_are_found_without_reading_images(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / "weather.csv").write_text("file,label\na.png,sun\nb.png,7\nc.png,hail\nd.png,0\n")
    report = run(tmp_path)
    found = {(f.kind, f.sample, f.task) for f in report.errors}
    assert found == {("invalid_label", "b.png", "weather"), ("invalid_label", "c.png", None)}
    assert report.bad_samples == {"train": 2, "val": 0, "test": 0}
