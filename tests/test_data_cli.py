"""Data through the command line: `data check`, `data.skip_bad`, the NYUv2 preset on a generated folder, and a
multi-input run (segmentation from scenes, digits from MultiMNIST) from one preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision.cli import main
from mtlvision.engine.trainer import Trainer

FAST = ["train.epochs=1", "train.progress=false", "model.backbone=resnet18"]
SIZE = 32


def write_folder(root: Path, corrupt: bool, bad_label: bool, wrong_size: bool = False) -> Path:
    """A `folder` dataset: 8 train / 2 val / 2 test PNGs, a weather CSV and segmentation masks; optionally
    one train image that is not a PNG, one train label outside the 3 classes and one train mask (t2) taller
    than its image."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    rows = ["file,label"]
    splits = {"train": [f"t{i}.png" for i in range(8)], "val": ["v0.png", "v1.png"], "test": ["s0.png", "s1.png"]}
    for split, keys in splits.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(keys) + "\n")
        for key in keys:
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "images" / key)
            Image.fromarray(rng.integers(0, 4, (SIZE, SIZE), dtype=np.uint8)).save(root / "masks" / key)
            rows.append(f"{key},{rng.integers(0, 3)}")
    if corrupt:
        (root / "images" / "t3.png").write_bytes(b"this is not a png")
    if bad_label:
        rows[1 + 5] = "t5.png,7"
    if wrong_size:
        Image.fromarray(np.zeros((SIZE + 8, SIZE), dtype=np.uint8)).save(root / "masks" / "t2.png")
    (root / "weather.csv").write_text("\n".join(rows) + "\n")
    config = {
        "data": {
            "name": "folder",
            "root": str(root),
            "tasks": {
                "weather": {"kind": "classification", "path": "weather.csv", "num_classes": 3},
                "segmentation": {"kind": "segmentation", "path": "masks", "num_classes": 4},
            },
        },
        "train": {"batch_size": 4},
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_data_check_finds_the_corrupt_image_and_the_bad_label(tmp_path, capsys):
    config = write_folder(tmp_path / "bad", corrupt=True, bad_label=True)
    assert main(["data", "check", str(config)]) == 1
    out = capsys.readouterr()
    assert "unreadable" in out.out and "t3.png" in out.out
    assert "invalid_label" in out.out and "t5.png" in out.out and "out of range" in out.out
    assert "2 error(s) found" in out.err

    clean = write_folder(tmp_path / "clean", corrupt=False, bad_label=False)
    assert main(["data", "check", str(clean), "--splits", "train", "val"]) == 0
    out = capsys.readouterr().out
    assert "No problems found" in out and "test" not in out.split("Data check")[1].split("No problems")[0]


@pytest.mark.parametrize(
    "corrupt, bad_label, named, workers",
    [(True, False, "t3.png", 0), (False, True, "t5.png", 0), (True, False, "t3.png", 1)],
)
def test_training_stops_with_the_bad_file_named(tmp_path, capsys, corrupt, bad_label, named, workers):
    config = write_folder(tmp_path / "data", corrupt=corrupt, bad_label=bad_label)
    args = ["train", str(config), "--set", *FAST, f"data.num_workers={workers}", "--out", str(tmp_path / "runs")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    if bad_label:
        assert "label 7 is out of range" in err


def test_skip_bad_trains_and_reports_how_many(tmp_path, capsys):
    config = write_folder(tmp_path / "data", corrupt=True, bad_label=True)
    runs = tmp_path / "runs"
    assert main(["train", str(config), "--set", *FAST, "data.skip_bad=true", "--out", str(runs), "--name", "r"]) == 0
    report = json.loads((runs / "r" / "metrics.json").read_text())
    assert report["skipped_samples"] == {"train": 2, "val": 0, "test": 0}
    printed = capsys.readouterr()
    assert "2 unreadable or invalid sample(s) skipped" in " ".join((printed.out + printed.err).split())
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(runs / "r"), "--split", "train", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["skipped_samples"] == {"train": 2}


def write_nyuv2(root: Path, counts: dict[str, int]) -> None:
    """The mtan/LibMTL layout {root}/{train,val}/{image,label,depth,normal}/{i}.npy with its dtypes."""
    rng = np.random.default_rng(1)
    for split, count in counts.items():
        for sub in ("image", "label", "depth", "normal"):
            (root / split / sub).mkdir(parents=True)
        for i in range(count):
            normal = rng.normal(size=(SIZE, SIZE, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=2, keepdims=True)
            arrays = {
                "image": rng.random((SIZE, SIZE, 3)).astype(np.float32),
                "label": rng.integers(-1, 13, (SIZE, SIZE)).astype(np.float32),
                "depth": (rng.random((SIZE, SIZE, 1)) * 9 + 0.5).astype(np.float32),
                "normal": normal,
            }
            for sub, array in arrays.items():
                np.save(root / split / sub / f"{i}.npy", array)


def test_nyuv2_preset_trains_on_a_generated_folder(tmp_path):
    root = tmp_path / "nyuv2"
    write_nyuv2(root, {"train": 9, "val": 3})
    runs = tmp_path / "runs"
    args = [
        "train",
        "nyuv2",
        "--set",
        f"data.root={root}",
        *FAST,
        "train.batch_size=4",
        "--out",
        str(runs),
        "--name",
        "nyu",
    ]
    assert main(args) == 0
    report = json.loads((runs / "nyu" / "metrics.json").read_text())
    assert set(report["metrics"]) == {"segmentation", "depth", "normals"}
    assert 0.0 <= report["metrics"]["segmentation"]["miou"] <= 1.0
    assert (
        np.isfinite(report["metrics"]["normals"]["mean_angle"])
        if "mean_angle" in report["metrics"]["normals"]
        else all(np.isfinite(v) for v in report["metrics"]["normals"].values())
    )


def test_nyuv2_without_its_data_names_the_missing_folder(tmp_path, capsys):
    def error() -> str:
        return "".join(capsys.readouterr().err.split())  # rich wraps long lines

    assert main(["train", "nyuv2", "--set", *FAST, "--out", str(tmp_path / "runs")]) == 2
    err = error()
    assert "data.rootisnotset" in err and "{root}/{train,val}" in err and "Traceback" not in err
    missing = tmp_path / "nowhere"
    assert main(["train", "nyuv2", "--set", f"data.root={missing}", *FAST, "--out", str(tmp_path / "runs")]) == 2
    assert f"data.root'{missing}'isnotafolder" in error()
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind


def test_multi_demo_learns_each_task_from_its_own_source_only(tmp_path, monkeypatch):
    seen: list[dict[str, int]] = []
    original = Trainer.task_losses

    def checked(self, predictions, batch):
        """The masked per-task losses must equal each task's loss over its own source's samples alone."""
        losses = original(self, predictions, batch)
        own = {"segmentation": "scenes:", "digit": "digits:"}
        for index, (name, task) in enumerate(self.tasks.items()):
            rows = torch.tensor([i.startswith(own[name]) for i in batch["ids"]])
            assert torch.equal(batch["valid"][name].cpu(), rows), name
            subset = task.loss(
                predictions[name][rows], batch["targets"][name][rows], torch.ones(int(rows.sum()), dtype=torch.bool)
            )
            assert torch.allclose(losses[index], subset.float(), rtol=1e-5, atol=1e-6), name
        if torch.is_grad_enabled():
            seen.append({name: int(v.sum()) for name, v in batch["valid"].items()})
        return losses

    monkeypatch.setattr(Trainer, "task_losses", checked)
    sizes = [
        f"data.sources.{s}.{k}={n}"
        for s in ("scenes", "digits")
        for k, n in (("train_size", 4), ("val_size", 3), ("test_size", 3))
    ]
    runs = tmp_path / "runs"
    args = [
        "train",
        "multi_demo",
        "--set",
        *sizes,
        "data.sources.digits.train_size=8",
        "data.augment.resize=[32,32]",
        "data.sources.scenes.image_size=32",
        *FAST,
        "train.batch_size=6",
        "--out",
        str(runs),
        "--name",
        "m",
    ]
    assert main(args) == 0
    report = json.loads((runs / "m" / "metrics.json").read_text())
    assert set(report["metrics"]) == {"segmentation", "digit"}
    assert 0.0 <= report["metrics"]["digit"]["accuracy"] <= 1.0
    assert 0.0 <= report["metrics"]["segmentation"]["miou"] <= 1.0
    # proportional mixing of 4 scenes and 8 digit images: 2 + 4 of every batch of 6; 8 / 4 = 2 steps
    assert seen == [{"segmentation": 2, "digit": 4}] * 2


def test_office_preset_mixes_domains_per_step_and_resumes_mid_epoch(tmp_path):
    from mtlvision.config import load_config
    from mtlvision.engine.build import build_split, build_tasks
    from mtlvision.models import MultiTaskModel
    from tests.data.test_office import write_office31
    from tests.engine.tinyrun import tiny_backbone

    write_office31(tmp_path, {"amazon": 6, "dslr": 3, "webcam": 3})
    config = load_config("office31", {"data.root": str(tmp_path), "data.augment.resize": [16, 16]})
    tasks = build_tasks(config)
    data = build_split(config, tasks, "train", train=True)
    trainer = Trainer(MultiTaskModel(tiny_backbone, tasks), epochs=1, batch_size=4, progress=False, device="cpu")
    batches = list(trainer.loader(data, shuffle=True, epoch=1))
    # proportional: p = (1/2, 1/4, 1/4), 2 + 1 + 1 per batch of 4; an epoch walks amazon once: 6 / 2 = 3 steps
    assert len(batches) == 3
    for batch in batches:
        domains = [i.split(":")[0] for i in batch["ids"]]
        assert sorted(domains) == ["amazon", "amazon", "dslr", "webcam"]
        for task in ("amazon", "dslr", "webcam"):
            assert batch["valid"][task].tolist() == [d == task for d in domains]
    assert len({i for b in batches for i in b["ids"] if i.startswith("amazon")}) == 6
    resumed = list(trainer.loader(data, shuffle=True, epoch=1, start=1 * 4))
    assert [b["ids"] for b in resumed] == [b["ids"] for b in batches[1:]]
    assert [b["ids"] for b in trainer.loader(data, shuffle=True, epoch=2)] != [b["ids"] for b in batches]


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@pytest.mark.parametrize("augment", [[], ["data.augment.resize=[24,24]"]])
def test_a_mask_of_the_wrong_size_stops_training_with_file_and_task_named(tmp_path, capsys, augment):
    """It used to crash collate ("stack expects each tensor to be equal size"), or with a resize be stretched."""
    config = write_folder(tmp_path / "data", corrupt=False, bad_label=False, wrong_size=True)
    args = ["train", str(config), "--set", *FAST, *augment, "--out", str(tmp_path / "runs")]
    assert main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert "masks/t2.png: task 'segmentation': the target is (40, 32) but the image is (32, 32)" in err
    assert "mtlvision data check" in err and "data.skip_bad=true" in err
    assert "stack expects" not in err and "Traceback" not in err


def test_skip_bad_skips_as_many_samples_as_data_check_reports(tmp_path, capsys):
    from mtlvision import api

    config = write_folder(tmp_path / "data", corrupt=True, bad_label=True, wrong_size=True)
    assert main(["data", "check", str(config)]) == 1
    assert "bad samples (train 3, val 0, test 0)" in one_line(capsys.readouterr().out)
    report = api.check_data(str(config), progress=False)
    runs = tmp_path / "runs"
    assert main(["train", str(config), "--set", *FAST, "data.skip_bad=true", "--out", str(runs), "--name", "r"]) == 0
    skipped = json.loads((runs / "r" / "metrics.json").read_text())["skipped_samples"]
    assert skipped == report.bad_samples == {"train": 3, "val": 0, "test": 0}


def test_train_stops_before_training_on_a_leak_or_a_path_outside_the_data(tmp_path, capsys, monkeypatch):
    from mtlvision import api, cli

    monkeypatch.setattr(cli.console, "width", 400)  # the report table wraps words at the terminal's width
    from mtlvision.errors import DataError

    config = write_folder(tmp_path / "data", corrupt=False, bad_label=False)
    splits = tmp_path / "data" / "splits"
    (splits / "val.txt").write_text("v0.png\nt4.png\n")  # a training image in val
    runs = tmp_path / "runs"
    assert main(["train", str(config), "--set", *FAST, "--out", str(runs)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "data check before training: 1 error(s)" in err and "val/t4.png: the same image file as train/t4.png" in err
    assert "data.check=warn" in err and "mtlvision data check" in err and not runs.exists()
    with pytest.raises(DataError, match="leak into evaluation"):
        api.train(str(config), ["train.epochs=1"], out=runs)
    (splits / "val.txt").write_text("v0.png\nv1.png\n")
    (tmp_path / "secret.png").write_bytes((tmp_path / "data" / "images" / "t0.png").read_bytes())
    (splits / "train.txt").write_text((splits / "train.txt").read_text() + "../../secret.png\n")
    assert main(["data", "check", str(config), "--splits", "train"]) == 1
    out = one_line(capsys.readouterr().out)
    assert "outside_root" in out and "train.txt, line 9" in out
    assert main(["train", str(config), "--set", *FAST, "--out", str(runs)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "leads outside" in err and "data.skip_bad=true" in err and not runs.exists()


def test_data_check_warn_trains_anyway(tmp_path, capsys):
    config = write_folder(tmp_path / "data", corrupt=False, bad_label=False)
    (tmp_path / "data" / "splits" / "test.txt").write_text("s0.png\nt1.png\n")
    runs = tmp_path / "runs"
    args = ["train", str(config), "--set", *FAST, "data.check=warn", "--out", str(runs), "--name", "w"]
    assert main(args) == 0 and (runs / "w" / "metrics.json").is_file()
    assert "test/t1.png: the same image file as train/t1.png" in one_line(capsys.readouterr().err)


def test_images_above_max_pixels_are_refused_naming_the_file(tmp_path, capsys):
    config = write_folder(tmp_path / "data", corrupt=False, bad_label=False)
    assert main(["data", "check", str(config), "--splits", "val", "--set", "data.max_pixels=1000"]) == 1
    assert "too_large" in capsys.readouterr().out
    args = ["train", str(config), "--set", *FAST, "data.max_pixels=1000", "--out", str(tmp_path / "runs")]
    assert main(args) == 2
    err = one_line(capsys.readouterr().err)
    assert "the image is 32 x 32 = 1,024 pixels, above data.max_pixels = 1,000" in err and ".png" in err


def test_experts_on_images_of_the_data_own_size_merge_and_report_their_size(tmp_path):
    """A dataset without a configured image size (the folder format): merge measures the model on a sample."""
    config = write_folder(tmp_path / "data", corrupt=False, bad_label=False)
    runs = tmp_path / "runs"
    assert main(["baseline", str(config), "--set", *FAST, "--out", str(runs), "--name", "experts"]) == 0
    assert main(["merge", str(runs / "experts"), "--out", str(runs / "merged")]) == 0
    report = json.loads((runs / "merged" / "metrics.json").read_text())
    assert report["model"]["parameters"]["total"] > 0 and report["model"]["macs"]["total"] > 0
