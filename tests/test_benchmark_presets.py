"""The benchmark presets (SegNet-MTAN on NYUv2 / Cityscapes, LibMTL's ResNet-50 on NYUv2) train on generated
folders in the real layouts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mtlvision.cli import main
from mtlvision.config import load_config
from mtlvision.evaluation.published import compare_published
from mtlvision.models import create_backbone

from .data import test_cityscapes, test_nyuv2

# SegNet pools five times: the generated images are 32 x 32 (the real ones are 288 x 384 and 128 x 256)
SMALL = {"H": 32, "W": 32}
TWO_EPOCHS = ["train.epochs=2", "train.select=mean_last:2", "train.progress=false"]


def test_the_presets_state_their_protocol():
    for name, tasks, batch in (("nyuv2_segnet_mtan", 3, 2), ("cityscapes_segnet_mtan", 2, 8)):
        config = load_config(name)
        assert config.model.backbone == "segnet" and config.model.architecture_name == "segnet_mtan"
        assert config.model.architecture_params == {"balance_attention": True}
        assert all(task.task_params == {"reduction": "pixel"} for task in config.tasks or [])  # their pooled losses
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


def test_nyuv2_resnet50_states_libmtls_protocol():
    config = load_config("nyuv2_resnet50")
    assert (config.model.backbone, config.model.architecture_name) == ("resnet50_dilated", "hps")
    assert [(t.head, t.task_params) for t in config.tasks or []] == [("deeplabv3", {"reduction": "pixel"})] * 3
    train = config.train
    assert (train.optimizer, train.lr, train.weight_decay, train.batch_size, train.epochs) == (
        "adam",
        1e-4,
        1e-5,
        8,
        200,
    )
    assert (train.scheduler, train.step_size, train.gamma) == ("step", 100, 0.5)
    assert train.select == "delta_m_first" and config.data.augment == {}


@pytest.mark.slow  # a 72M-parameter network: ~20 s on two idle cores
def test_nyuv2_resnet50_trains_two_epochs_from_a_local_torchvision_checkpoint(tmp_path, monkeypatch, capsys):
    import torch
    import torchvision
    from safetensors.torch import save_file

    for name, value in SMALL.items():
        monkeypatch.setattr(test_nyuv2, name, value)
    test_nyuv2.write_nyu(tmp_path / "nyuv2", {"train": 3, "val": 1})
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet50(weights=None).state_dict()  # stands for the ImageNet file
    save_file({k: v.contiguous() for k, v in imagenet.items()}, str(tmp_path / "resnet50.safetensors"))
    runs, name = tmp_path / "runs", "nyuv2_resnet50"
    overrides = [
        f"data.root={tmp_path / 'nyuv2'}",
        "data.val_fraction=0.34",
        "train.epochs=2",
        "train.batch_size=2",
        # LibMTL's rule divides by the first epoch's metrics, and this untrained network's first-epoch depth
        # δ<1.25 is 0 (the rule itself: tests/engine/test_selection_protocols.py)
        "train.select=loss",
        "train.progress=false",
        "model.init=pretrained",
        f"model.pretrained={tmp_path / 'resnet50.safetensors'}",
    ]
    assert main(["train", name, "--set", *overrides, "--out", str(runs), "--name", name]) == 0
    report = json.loads((runs / name / "metrics.json").read_text())
    rows = list(csv.DictReader((runs / name / "history.csv").open()))
    assert len(rows) == 2 and report["best_epoch"] in (1, 2)
    assert report["model"]["parameters"]["total"] == 71_888_721  # LibMTL's network (facts fixture)
    assert set(report["metrics"]) == {"segmentation", "depth", "normals"}
    # the torchvision file loads into the dilated backbone as it is: every tensor, under torchvision's names
    backbone = create_backbone("resnet50_dilated", pretrained=tmp_path / "resnet50.safetensors")
    own = backbone.state_dict()
    assert all(torch.equal(own[key], imagenet[source]) for key, source in backbone.source_keys.items())
