"""Fair comparisons: every Δm states the budget behind each side; ``baseline --match RUN`` gives experts the
joint run's budget per task."""

import json

import pytest

import mtlvision as mv
from mtlvision.cli import main
from mtlvision.errors import MtlvisionError

TINY = {
    "data.image_size": 32,
    "data.train_size": 16,
    "data.val_size": 8,
    "data.test_size": 8,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.device": "cpu",
    "train.progress": False,
    "train.lr": 0.003,
    "tasks": ["count", "segmentation"],
}


@pytest.mark.slow
def test_matched_experts_share_the_joint_runs_budget_and_delta_m_states_both(tmp_path, capsys):
    joint = mv.train("scenes", {**TINY, "balancer.name": "pcgrad"}, out=tmp_path, name="joint")
    # 16 images in batches of 8: two optimiser steps per epoch, two epochs
    assert joint.report.compute == {"epochs": 2, "steps": 4, "train_images": 16, "batch_size": 8}
    stored = json.loads((joint.path / "metrics.json").read_text())
    assert stored["compute"] == joint.report.compute and stored["delta_m"] is None  # no experts yet

    assert main(["baseline", "--match", str(joint.path), "--out", str(tmp_path)]) == 0
    path = tmp_path / "baseline-joint" / "baselines.json"
    experts = json.loads(path.read_text())["experts"]
    assert set(experts) == {"count", "segmentation"}
    for task, expert in experts.items():
        assert expert["compute"] == joint.report.compute  # the same images, as often, per task
        config = mv.Run.load(expert["run"]).config
        assert [t.name for t in config.tasks] == [task]
        assert config.balancer.name == "ew" and config.train.lr == pytest.approx(0.003)

    capsys.readouterr()
    assert main(["eval", str(joint.path), "--baselines", str(path)]) == 0
    out = capsys.readouterr().out
    assert "compute: this run 2 epochs, 4 steps of 8 (32 images seen per task)" in out
    assert "expert count 2 epochs, 4 steps of 8 (32 images seen per task)" in out
    report = mv.evaluate(joint.path, baselines=path)
    assert report.delta_m["compute"]["run"] == joint.report.compute
    assert report.delta_m["compute"]["experts"]["segmentation"] == joint.report.compute
    assert report.delta_m_warning is None  # matched experts differ from the run only in tasks and balancing
    # the experts' folder names them as well as their file; experts given that do not exist are an error
    assert mv.evaluate(joint.path, baselines=path.parent).delta_m == report.delta_m
    with pytest.raises(MtlvisionError, match="nor a folder holding one"):
        mv.evaluate(joint.path, baselines=tmp_path / "no-such-experts")


def test_match_refuses_a_second_configuration(tmp_path):
    with pytest.raises(MtlvisionError, match="takes the run's own configuration"):
        mv.baseline("scenes", match=tmp_path / "joint", out=tmp_path)
