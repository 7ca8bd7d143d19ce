"""``check_dataset`` finds planted errors; ``SkipBadSamples`` skips and counts unreadable samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from mtlvision.data.check import CheckedSamples, SkipBadSamples, check_dataset, render_report
from mtlvision.data.datasets import DATASETS
from mtlvision.data.guard import guard_split
from mtlvision.errors import DataError
from mtlvision.tasks import TASKS

H, W = 8, 8


def write(root: Path) -> None:
    """A folder dataset with one planted problem per sample, in train and val."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "depth", "splits"):
        (root / sub).mkdir()
    images = {name: rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for name in "abcdefg"}
    images["g"] = images["a"]  # g (val) duplicates a (train)
    for name, pixels in images.items():
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
        Image.fromarray(rng.integers(0, 4, (H, W)).astype(np.uint8)).save(root / "masks" / f"{name}.png")
        np.save(root / "depth" / f"{name}.npy", rng.random((H, W)).astype(np.float32) + 0.5)
    (root / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt image
    bad = np.zeros((H, W), dtype=np.uint8)
    bad[2, 2] = 9  # out of range for 4 classes
    Image.fromarray(bad).save(root / "masks" / "c.png")
    nan_depth = np.ones((H, W), dtype=np.float32)
    nan_depth[0, 0] = np.nan
    np.save(root / "depth" / "d.npy", nan_depth)
    Image.fromarray(np.zeros((H + 2, W), dtype=np.uint8)).save(root / "masks" / "e.png")  # wrong size
    (root / "masks" / "f.png").unlink()  # a missing label is not an error
    coco = {
        "images": [{"id": i, "file_name": f"{n}.png"} for i, n in enumerate("abcdefg")],
        "annotations": [{"id": 1, "image_id": 4, "category_id": 1, "bbox": [5, 5, 6, 2]}],  # beyond W
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "boxes.json").write_text(json.dumps(coco))
    (root / "splits" / "train.txt").write_text("a\nb\nc\nd\ne\nf\n".replace("\n", ".png\n"))
    (root / "splits" / "val.txt").write_text("g.png\n")
    (root / "splits" / "test.txt").write_text("")


def load(root: Path):
    source = DATASETS.get("folder")
    params = source.Params(
        name="folder",
        root=str(root),
        tasks={
            "seg": {"kind": "segmentation", "path": "masks", "num_classes": 4},
            "depth": {"kind": "depth", "path": "depth"},
            "objects": {"kind": "detection", "path": "boxes.json"},
        },
    )
    tasks = {n: TASKS.get(s.kind)(n, **s.params) for n, s in source.tasks(params).items()}
    return {split: source.build(params, split) for split in ("train", "val", "test")}, tasks


def test_planted_errors_are_found(tmp_path: Path) -> None:
    write(tmp_path)
    splits, tasks = load(tmp_path)
    report = check_dataset(splits, tasks)
    kinds = {(f.kind, f.sample, f.task) for f in report.errors}
    assert ("unreadable", "b.png", None) in kinds  # the file, not "train[1]"
    assert any("b.png" in f.message for f in report.errors if f.kind == "unreadable")
    assert ("invalid_label", "c.png", "seg") in kinds
    assert ("invalid_depth", "d.png", "depth") in kinds
    assert ("size_mismatch", "e.png", "seg") in kinds
    assert ("box_outside", "e.png", "objects") in kinds
    assert ("duplicate", "g.png", None) in kinds
    assert len(report.errors) == 6 and report.exit_code == 1
    train = report.splits["train"]
    assert train.samples == 6 and train.unreadable == 1
    seg = train.tasks["seg"]
    assert seg.missing == 1 and seg.rejected == 2 and seg.labelled == 2  # a, d
    assert sum(seg.class_counts.values()) == 2 * H * W
    depth = train.tasks["depth"]
    assert depth.labelled == 4 and 0.5 <= depth.value_min <= depth.value_max <= 1.5
    console = Console(width=200, record=True)
    console.print(render_report(report))
    assert report.error_count == 6
    console.print(report.table(max_findings=2))
    rendered = console.export_text()
    assert "invalid_depth" in rendered and "6 error(s)" in rendered and "train" in rendered
    assert "and 4 more" in rendered
    assert report.to_dict()["findings"][0]["kind"]


def test_clean_data_passes(tmp_path: Path) -> None:
    write(tmp_path)
    splits, tasks = load(tmp_path)
    clean = {"train": torch.utils.data.Subset(splits["train"], [0])}
    report = check_dataset(clean, tasks)
    assert report.ok and report.exit_code == 0 and not report.findings


def test_within_split_duplicate_is_a_warning(tmp_path: Path) -> None:
    write(tmp_path)
    splits, tasks = load(tmp_path)
    report = check_dataset({"train": torch.utils.data.Subset(splits["train"], [0, 0])}, tasks)
    assert report.ok and [f.kind for f in report.warnings] == ["duplicate"]


class Flaky(torch.utils.data.Dataset):
    def __init__(self, bad: set[int], size: int = 10) -> None:
        self.bad, self.size = bad, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        if i in self.bad:
            raise DataError(f"/data/{i}.png: cannot decode the image.")
        return i


def test_skip_bad_replaces_deterministically_and_counts() -> None:
    wrapped = SkipBadSamples(Flaky({3, 4, 9}))
    assert [wrapped[i] for i in range(10)] == [0, 1, 2, 5, 5, 5, 6, 7, 8, 0]
    assert wrapped.skipped == 3 and "/data/9.png" in wrapped.messages[9]
    with pytest.raises(DataError, match="/data/3.png"):
        Flaky({3})[3]  # without the wrapper the file is named
    with pytest.raises(DataError, match="every one of the 2 samples"):
        SkipBadSamples(Flaky({0, 1}, size=2))[0]


def test_skip_bad_count_is_shared_across_workers() -> None:
    wrapped = SkipBadSamples(Flaky({1, 6}))
    loader = torch.utils.data.DataLoader(wrapped, batch_size=2, num_workers=2)
    values = torch.cat(list(loader)).tolist()
    assert values == [0, 2, 2, 3, 4, 5, 7, 7, 8, 9] and wrapped.skipped == 2


def test_training_refuses_and_skips_exactly_the_samples_the_report_calls_bad(tmp_path: Path) -> None:
    """Same planted faults (corrupt image, label out of range, NaN depth, mask of another size, box outside):
    the report's bad-sample count is the count that data.skip_bad skips, and without skip_bad every one of
    them stops with its file, its task and the way out named."""
    write(tmp_path)
    splits, tasks = load(tmp_path)
    report = check_dataset(splits, tasks)
    assert report.bad_samples == {"train": 4, "val": 0, "test": 0}  # b, c, d, e (e twice: size and box)
    skipping = guard_split(splits["train"], tasks, "train", skip_bad=True)
    for index in range(len(skipping)):
        skipping[index]
    assert skipping.skipped == report.bad_samples["train"]
    stopping = guard_split(splits["train"], tasks, "train", skip_bad=False)
    messages = {}
    for index in range(len(stopping)):
        try:
            stopping[index]
        except DataError as error:
            messages[index] = str(error)
    assert sorted(messages) == [1, 2, 3, 4]
    assert "b.png" in messages[1] and "cannot decode" in messages[1]
    assert "masks/c.png: task 'seg'" in messages[2] and "[invalid_label]" in messages[2]
    assert "depth/d.npy: task 'depth'" in messages[3] and "[invalid_depth]" in messages[3]
    assert "masks/e.png: task 'seg': the target is (10, 8) but the image is (8, 8)" in messages[4]
    assert "1 more problem" in messages[4]  # the box outside the image
    for message in messages.values():
        assert "(train sample" in message and "mtlvision data check" in message and "data.skip_bad=true" in message


def test_a_mask_of_another_size_is_refused_as_read_not_resized(tmp_path: Path) -> None:
    """With a resize in the augmentation, the mask of the wrong size used to be stretched to fit."""
    from mtlvision.data.transforms import build_transforms, target_specs

    write(tmp_path)
    splits, tasks = load(tmp_path)
    checked = CheckedSamples(splits["train"], {"seg": tasks["seg"]}, "train")
    transform = build_transforms({"resize": [16, 16]}, target_specs(tasks), train=False)
    assert transform(checked[0])["targets"]["seg"].shape == (16, 16)
    with pytest.raises(DataError, match=r"e\.png: task 'seg': the target is \(10, 8\)"):
        transform(checked[4])


def test_the_report_names_classes_and_unreadable_files(tmp_path: Path) -> None:
    write(tmp_path)
    source = DATASETS.get("folder")
    (tmp_path / "weather.csv").write_text("file,label\na.png,rain\nc.png,sun\nd.png,rain\n")
    params = source.Params(
        name="folder",
        root=str(tmp_path),
        tasks={
            "weather": {"kind": "classification", "path": "weather.csv", "class_names": ["sun", "rain"]},
            "seg": {
                "kind": "segmentation",
                "path": "masks",
                "num_classes": 4,
                "class_names": ["road", "car", "tree", "sky"],
            },
        },
    )
    tasks = {n: TASKS.get(s.kind)(n, **s.params) for n, s in source.tasks(params).items()}
    report = check_dataset({"train": source.build(params, "train")}, tasks)
    weather = report.splits["train"].tasks["weather"].distribution()
    assert weather == "sun:1, rain:2"
    assert report.splits["train"].tasks["seg"].distribution().startswith("road:")
    unreadable = next(f for f in report.errors if f.kind == "unreadable")
    assert unreadable.sample == "b.png"
    console = Console(width=250, record=True)
    console.print(report.table())
    text = console.export_text()
    assert "sun:1, rain:2" in text and "data.skip_bad=true skips exactly these" in text
