"""``mtlvision affinity`` end to end: the run folder's files, --validate against experts, clear errors."""

from __future__ import annotations

import csv
import json

import pytest

import mtlvision as mv
from mtlvision.cli import main

from .test_cli import TINY


def test_affinity_validated_against_experts(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["baseline", "scenes", "--set", *TINY, "--out", str(out)]) == 0
    args = ["affinity", "scenes", "--set", *TINY, "--every", "1", "--groups", "2", "--validate", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "TAG affinity" in printed and "the grouping" in printed
    folder = out / "affinity-scenes"
    with open(folder / "affinity.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step_task", "count", "segmentation"]
    grouping = json.loads((folder / "grouping.json").read_text())
    assert grouping["groups"] == [["count", "segmentation"]]  # two tasks: the one group of two or more
    assert grouping["steps"] == 2 and grouping["search"] == "exact"  # 32 images, batches of 16, every step
    assert (folder / "plots" / "affinity.png").is_file()
    validation = json.loads((folder / "validation.json").read_text())
    joint = mv.Run.load(validation["all_together"]["run"])
    assert validation["all_together"]["delta_m"] == pytest.approx(joint.metrics["delta_m"])
    # the grouping serves each task from its group; here that group is all tasks together
    assert validation["grouped"]["delta_m"] == pytest.approx(joint.metrics["delta_m"])


def test_validate_without_experts_says_so_before_training(tmp_path, capsys):
    args = ["affinity", "scenes", "--set", *TINY, "--validate", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "run `mtlvision baseline`" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_one_task_cannot_be_grouped(tmp_path, capsys):
    assert main(["affinity", "scenes", "--set", *TINY, "tasks=[count]", "--out", str(tmp_path)]) == 2
    assert "at least two tasks" in capsys.readouterr().err


def test_train_with_diagnostics_writes_them_everywhere(tmp_path):
    out = tmp_path / "runs"
    assert main(["train", "scenes", "--set", *TINY, "diagnostics.every=1", "--out", str(out), "--name", "d"]) == 0
    folder = out / "d"
    with open(folder / "diagnostics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0.0", "1.0"]  # 32 images in batches of 16, every step
    assert {"cos/count~segmentation", "norm/count", "norm/segmentation", "conflict_share"} <= set(rows[0])
    with open(folder / "history.csv") as f:
        history = next(csv.DictReader(f))
    cosines = [float(r["cos/count~segmentation"]) for r in rows]
    assert float(history["diag/cos/count~segmentation"]) == pytest.approx(sum(cosines) / 2, rel=1e-5)
    assert (folder / "plots" / "gradient_cosines.png").is_file() and (folder / "plots" / "conflict_share.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"))
    events.Reload()
    assert "diagnostics/conflict_share" in events.Tags()["scalars"]
