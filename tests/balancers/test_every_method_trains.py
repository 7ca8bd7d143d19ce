"""Every registered balancer trains the built-in scenes end to end (all six task kinds, detection included)
without a non-finite step, through the public API. MultiMNIST over three seeds is benchmarks/
methods_multimnist.py (its table is in the README)."""

from __future__ import annotations

import math

import pytest

import mtlvision as mv
from mtlvision.balancers import BALANCERS

TINY_SCENES = {
    "data.image_size": 32,
    "data.train_size": 8,
    "data.val_size": 4,
    "data.test_size": 4,
    "train.epochs": 2,
    "train.batch_size": 4,
    "train.progress": False,
    "train.device": "cpu",
    "model.backbone": "test_resnet",
    "train.max_nonfinite": 1,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in BALANCERS.names() if n != "fixed"])
def test_every_balancer_trains_the_scenes_end_to_end(name: str, tmp_path) -> None:
    # train.max_nonfinite=1: a single non-finite loss or gradient stops the run with an error
    run = mv.train("scenes", {**TINY_SCENES, "balancer.name": name}, out=tmp_path, name=name)
    assert set(run.metrics) == {"count", "colors", "segmentation", "depth", "normals", "detection"}
    for task, metrics in run.metrics.items():
        assert all(math.isfinite(v) for v in metrics.values()), (task, metrics)
    history = (run.path / "history.csv").read_text().splitlines()
    skipped = history[0].split(",").index("skipped_steps")
    assert len(history) == 3 and all(float(row.split(",")[skipped]) == 0 for row in history[1:])
