"""EMR-merging end to end on tiny scenes: experts from one start, `mtlvision merge --rule emr`, then eval,
compare, predict, and the refusals of export and of training from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision import api, cli
from mtlvision.engine.build import is_plain_start, load_model
from mtlvision.engine.comparing import describe_run
from mtlvision.engine.runs import Baselines, Run
from mtlvision.models import MultiTaskModel
from mtlvision.models.modulated import TaskModulatedModel

TINY = {
    "data.image_size": 32,
    "data.train_size": 16,
    "data.val_size": 4,
    "data.test_size": 8,
    "train.epochs": 2,
    "train.batch_size": 4,
    "train.progress": False,
    "train.device": "cpu",
    "model.backbone": "test_resnet",  # has BatchNorm: its statistics are recomputed per task
    "tasks": ["count", "segmentation"],
}

# two experts trained, merged and evaluated (about 15 s of CPU): the file's tests are marked slow
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("emr-runs")
    baselines = api.baseline("scenes", TINY, out=out)
    merged = out / "m-emr"
    assert cli.main(["merge", str(baselines.parent), "--rule", "emr", "--out", str(merged)]) == 0
    return {"out": out, "baselines": baselines, "merged": merged}


def test_the_merged_run_holds_one_backbone_per_task_rebuilt_from_its_compact_weights(emr: dict[str, Path]) -> None:
    run = Run.load(emr["merged"])
    record = run.evaluated.merge
    assert record is not None and record["rule"] == "emr"
    assert record["batch_norm"] == "recomputed on the train split for each task's backbone on its own"
    specific = record["task_specific"]
    assert specific["groups"] == [["count"], ["segmentation"]] and len(specific["rescalers"]) == 2
    assert all(0 < d <= 1 for d in specific["mask_density"]) and specific["storage"]["forwards_per_batch"] == 2
    model, _ = load_model(run)
    assert isinstance(model, TaskModulatedModel)
    # each task's statistics are its own backbone's, not one average
    stats = [model.group_state(g) for g in range(2)]
    name = model.layout.statistics[0]
    assert not torch.equal(stats[0][name], stats[1][name])
    # the stored metrics are what loading the compact weights gives back
    again = api.evaluate(run.path)
    for task, values in run.evaluated.metrics.items():
        for metric, value in values.items():
            assert again.metrics[task][metric] == pytest.approx(value, abs=1e-6)
    # the backbone of each task, loaded into a plain model, predicts that task as the merged model does
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predictions = model(images)
        for g, task in enumerate(("count", "segmentation")):
            plain = MultiTaskModel("test_resnet", list(model.tasks.values()))
            plain.load_state_dict(stats[g])
            torch.testing.assert_close(plain.eval()(images)[task], predictions[task])


def test_compare_says_it_is_task_specific_and_counts_what_it_stores_and_runs(emr: dict[str, Path], capsys) -> None:
    assert describe_run(Run.load(emr["merged"])) == "merged (emr, task-specific backbones: 2 forwards), before training"
    out = emr["out"] / "cmp"
    assert cli.main(["compare", str(emr["merged"]), "--out", str(out), "--repeats", "1", "--batch-size", "2"]) == 0
    report = json.loads((out / "compare.json").read_text())
    merged = next(m for m in report["models"] if m["label"] == "m-emr")
    assert "task-specific backbones: 2 forwards" in merged["kind"]
    storage = Run.load(emr["merged"]).evaluated.merge["task_specific"]["storage"]
    assert merged["parameters"] == storage["stored_values"] > storage["parameters"]
    capsys.readouterr()


def test_predict_runs_every_tasks_own_backbone(emr: dict[str, Path], tmp_path) -> None:
    image = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    results = api.predict(emr["merged"], [image], out=tmp_path / "p")
    assert set(results[0]["tasks"]) == {"count", "segmentation"}
    assert cli.main(["predict", str(emr["merged"]), str(image), "--out", str(tmp_path / "q")]) == 0


def test_export_and_training_from_it_are_refused_with_the_reason(emr: dict[str, Path], capsys) -> None:
    assert cli.main(["export", str(emr["merged"]), "--out", str(emr["out"] / "m.onnx")]) == 2
    assert "no single set of plain weights: ONNX export needs one network" in capsys.readouterr().err
    code = cli.main(
        [
            "train",
            "scenes",
            "--out",
            str(emr["out"]),
            "--name",
            "joint",
            "--set",
            *[f"{k}={json.dumps(v)}" for k, v in TINY.items()],
            f"model.init={emr['merged']}",
        ]
    )
    assert code == 2
    assert "no single set of weights to start from" in capsys.readouterr().err
    assert not is_plain_start(emr["merged"])  # what the merging benchmark reads to skip it as a start
    assert all(is_plain_start(run) for run in Baselines.load(emr["baselines"]).expert_runs().values())
    experts = Baselines.load(emr["baselines"]).expert_runs()
    assert cli.main(["merge", str(experts["count"]), "--rule", "emr", "--out", str(emr["out"] / "one")]) == 2
    assert "at least two experts" in capsys.readouterr().err
