"""End to end through the command line: train, eval, predict, baseline (Δm), list, and bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from mtlvision.cli import main

TINY = [
    "data.image_size=32",
    "data.train_size=32",
    "data.val_size=16",
    "data.test_size=16",
    "train.epochs=1",
    "train.batch_size=16",
    "tasks=[count,segmentation]",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "scenes", "--set", *TINY, "--out", str(out), "--name", "joint"]) == 0
    return out


def test_train_writes_the_run_folder(trained):
    run = trained / "joint"
    for name in ("config.yaml", "metrics.json", "history.csv", "model.safetensors"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoint.pt").exists()  # a finished run keeps what inference needs (train.keep_checkpoint)
    assert (run / "plots" / "losses.png").is_file() and (run / "plots" / "metrics_segmentation.png").is_file()
    report = json.loads((run / "metrics.json").read_text())
    assert set(report["metrics"]) == {"count", "segmentation"}
    assert 0.0 <= report["metrics"]["segmentation"]["miou"] <= 1.0
    assert report["model"]["parameters"]["total"] > report["model"]["parameters"]["shared"] > 0
    assert report["delta_m"] is None and "mtlvision baseline" in report["delta_m_note"]


def test_eval_reproduces_the_stored_test_metrics(trained, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(trained / "joint"), "--json", str(out_json)]) == 0
    stored = json.loads((trained / "joint" / "metrics.json").read_text())["metrics"]
    fresh = json.loads(out_json.read_text())["metrics"]
    for task, values in stored.items():
        for metric, value in values.items():
            assert fresh[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)


def test_predict_writes_json_and_pictures(trained, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "preds"
    assert main(["predict", str(trained / "joint"), str(images / "0.png"), str(images), "--out", str(out)]) == 0
    record = json.loads((out / "0.json").read_text())
    assert set(record["tasks"]) == {"count", "segmentation"}
    assert record["tasks"]["count"]["class_name"] in {"1", "2", "3", "4"}
    mask = np.array(Image.open(out / record["tasks"]["segmentation"]["mask"]))
    assert mask.shape == (40, 50)  # the input's own size, not the network's 32 x 32
    picture = Image.open(out / "0.png")
    assert picture.width == 3 * 320 and picture.height > 256  # panels enlarged to be readable


def test_baseline_then_eval_reports_delta_m(trained, capsys):
    assert main(["baseline", "scenes", "--set", *TINY, "--out", str(trained)]) == 0
    stored = json.loads((trained / "baseline-scenes" / "baselines.json").read_text())
    assert set(stored["experts"]) == {"count", "segmentation"}
    capsys.readouterr()
    assert main(["eval", str(trained / "joint")]) == 0
    printed = capsys.readouterr().out
    assert "Δm =" in printed and "baseline-scenes" in printed


@pytest.mark.parametrize("kind", ["tasks", "balancers", "architectures", "backbones", "datasets"])
def test_list(kind, capsys):
    assert main(["list", kind]) == 0
    expected = {
        "tasks": "segmentation",
        "balancers": "ew",
        "architectures": "hps",
        "backbones": "resnet18",
        "datasets": "scenes",
    }[kind]
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "scenes", "--set", "tasks=[nope]"], "has no task 'nope'"),
        (["train", "scenes", "--set", "balancer.name=nope"], "Unknown balancer 'nope'"),
        (["train", "scenes", "--set", "model.backbone=resnet_nope", *TINY], "resnet_nope"),
        (["train", "scenes", "--set", "train.epochs=zero"], "train.epochs"),
        (["train", "no_such_preset"], "Presets:"),
        (["train", "multimnist", "--set", "data.root=/no/such/mnist"], "/no/such/mnist"),
        (
            [
                "train",
                "scenes",
                "--set",
                *TINY,
                "balancer.name=mgda",
                "balancer.mode=representation",
                "balancer.jacobian=layers",
            ],
            "parameter-mode path",
        ),
    ],
)
def test_bad_input_is_one_paragraph_without_traceback(args, fragment, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path)] if args[0] == "train" else args) == 2
    err = capsys.readouterr().err
    assert fragment in " ".join(err.split()) and "Traceback" not in err


def test_a_gramian_method_trains_on_the_layer_path(tmp_path):
    args = ["train", "scenes", "--set", *TINY, "balancer.name=upgrad", "balancer.jacobian=layers"]
    assert main([*args, "--out", str(tmp_path), "--name", "layers"]) == 0
    history = (tmp_path / "layers" / "history.csv").read_text().splitlines()
    assert len(history) == 2 and "nan" not in history[1]


def test_malformed_yaml_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: scenes\n")
    assert main(["train", str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_undecodable_image_is_named(trained, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict", str(trained / "joint"), str(broken), "--out", str(tmp_path / "p")]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_metrics_table_leaves_details_that_are_not_delta_m_terms_blank() -> None:
    """Detection reports per-class AP beside its means; only the means are Δm terms."""
    from rich.console import Console

    from mtlvision.cli import _metrics_table

    metrics = {"detection": {"map_50": 0.8, "ap_50/cube": 0.7}}
    delta = {"per_metric": {"detection": {"map_50": 1.5}}}
    console = Console(width=120, record=True)
    console.print(_metrics_table("t", metrics, delta))
    text = console.export_text()
    assert "+1.50" in text and "ap_50/cube" in text and "0.7000" in text


def test_scenes_detection_preset_trains_and_reports_per_class_ap(tmp_path):
    """The detection preset end to end at a tiny size: its three tasks, the per-class AP of every shape
    that has a box in the test split, and the means Δm uses."""
    tiny = [
        "data.image_size=32",
        "data.train_size=16",
        "data.val_size=8",
        "data.test_size=8",
        "train.epochs=1",
        "train.batch_size=8",
        "train.progress=false",
    ]
    assert main(["train", "scenes_detection", "--set", *tiny, "--out", str(tmp_path), "--name", "det"]) == 0
    report = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert set(report["metrics"]) == {"detection", "segmentation", "depth"}
    detection = report["metrics"]["detection"]
    assert {"map_50", "map", "recall"} <= set(detection)
    per_class = {key.removeprefix("ap_50/") for key in detection if key.startswith("ap_50/")}
    assert per_class and per_class <= {"sphere", "cube", "cylinder", "cone"}
    assert all(0.0 <= value <= 1.0 for value in detection.values())
