"""The SegNet-MTAN benchmark presets train on generated folders in the real NYUv2 / Cityscapes layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mtlvision.cli import main
from mtlvision.config import load_config
from mtlvision.evaluation.published import compare_published

from .data import test_cityscapes, test_nyuv2

# SegNet pools five times: the generated images are 32 x 32 (the real ones are 288 x 384 and 128 x 256)
SMALL = {"H": 32, "W": 32}
TWO_EPOCHS = ["train.epochs=2", "train.select=mean_last:2", "train.progress=false"]


def test_the_presets_state_their_protocol():
    for name, tasks, batch in (("nyuv2_segnet_mtan", 3, 2), ("cityscapes_segnet_mtan", 2, 8)):
        config = load_config(name)
        assert config.model.backbone == "segnet" and config.model.architecture_name == "segnet_mtan"
        assert config.model.architecture_params == {"balance_attention": True}
        assert len(config.tasks or []) == tasks and config.train.batch_size == batch
        train = config.train
        assert (train.optimizer, train.lr, train.weight_decay, train.epochs) == ("adam", 1e-4, 0.0, 200)
        assert (train.scheduler, train.step_size, train.gamma) == ("step", 100, 0.5)
        assert train.select == "mean_last:10" and train.eval_split == "test"


def run_preset(preset: str, root: Path, runs: Path) -> dict:
    args = ["train", preset, "--set", f"data.root={root}", *TWO_EPOCHS, "--out", str(runs), "--name", preset]
    assert main(args) == 0
    report = json.loads((runs / preset / "metrics.json").read_text())
    rows = list(csv.DictReader((runs / preset / "history.csv").open()))
    assert len(rows) == 2 and report["best_epoch"] == 2
    miou = [float(row["eval/segmentation/miou"]) for row in rows]
    assert report["metrics"]["segmentation"]["miou"] == pytest.approx(sum(miou) / 2, rel=1e-6)
    return report


def test_nyuv2_segnet_mtan_trains_two_epochs_and_prints_its_row_beside_the_published_ones(
    tmp_path, monkeypatch, capsys
):
    for name, value in SMALL.items():
        monkeypatch.setattr(test_nyuv2, name, value)
    test_nyuv2.write_nyu(tmp_path / "nyuv2", {"train": 2, "val": 1})
    report = run_preset("nyuv2_segnet_mtan", tmp_path / "nyuv2", tmp_path / "runs")
    assert set(report["metrics"]) == {"segmentation", "depth", "normals"}
    assert report["model"]["parameters"]["total"] == 44_229_073  # the reference's count less its 3 log-variances

    capsys.readouterr()
    run = tmp_path / "runs" / "nyuv2_segnet_mtan"
    assert main(["eval", str(run), "--against", "nyuv2_segnet_mtan"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    expected = compare_published(report["metrics"], "nyuv2_segnet_mtan").rows[-1].delta_m
    assert "single task" in out and "nash-mtl experiments/nyuv2/utils.py" in out.lower()
    assert f"against the published single-task row: {expected:+.2f}%" in out


def test_cityscapes_segnet_mtan_trains_two_epochs_on_the_mtan_layout(tmp_path, monkeypatch):
    for name, value in SMALL.items():
        monkeypatch.setattr(test_cityscapes, name, value)
    test_cityscapes.write_cityscapes(tmp_path / "cityscapes", {"label_7": 7}, {"train": 2, "val": 1})
    report = run_preset("cityscapes_segnet_mtan", tmp_path / "cityscapes", tmp_path / "runs")
    assert set(report["metrics"]) == {"segmentation", "depth"}
