"""ONNX export of a run with every task kind of the scenes (detection's dict outputs included): the graph
reproduces PyTorch on new batches of any size, and the JSON beside it describes what comes out."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlvision import api
from mtlvision.cli import main
from mtlvision.errors import ConfigError

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def run(six_task_run: Path) -> Path:
    return six_task_run


@pytest.fixture(scope="module")
def exported(run: Path) -> Path:
    assert main(["export", str(run)]) == 0
    return run / "model.onnx"


def test_the_graph_reproduces_pytorch_on_a_new_batch_size(run: Path, exported: Path) -> None:
    model, _ = api.load_model(run)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {"image": images.numpy()}), strict=True))
    with torch.no_grad():
        want = model(images)
    assert {
        "count",
        "colors",
        "segmentation",
        "depth",
        "normals",
        "detection.cls_logits",
        "detection.box_distances",
        "detection.centerness",
        "detection.points",
        "detection.strides",
    } == set(names)
    for name, value in got.items():
        task, _, key = name.partition(".")
        reference = (want[task][key] if key else want[task]).numpy()
        np.testing.assert_allclose(value, reference, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(reference).max()))
    # the normals stay unit vectors and the box distances positive: post-processing is in the graph
    np.testing.assert_allclose(np.linalg.norm(got["normals"], axis=1), 1.0, rtol=1e-4)
    assert (got["detection.box_distances"] > 0).all()


def test_the_description_names_every_output_and_its_batch_axis(exported: Path) -> None:
    description = json.loads(exported.with_suffix(".json").read_text())
    assert description["input"]["shape"] == ["batch", 3, 32, 32]
    shapes = {o["name"]: o["shape"] for o in description["outputs"]}
    assert shapes["segmentation"][0] == "batch" and shapes["segmentation"][2:] == [32, 32]
    assert shapes["detection.points"][0] != "batch" and shapes["detection.points"][1] == 2
    assert description["tasks"]["detection"]["nms_iou"] == 0.5
    assert len(description["tasks"]["segmentation"]["class_names"]) == shapes["segmentation"][1]


def test_missing_onnx_packages_are_named(run: Path, monkeypatch, tmp_path: Path) -> None:
    real_import = builtins.__import__

    def without_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxscript)
    with pytest.raises(ConfigError, match=r"mtlvision\[export\]"):
        api.export(run, tmp_path / "x.onnx")


def test_following_the_description_reproduces_predict(run: Path, exported: Path, tmp_path: Path) -> None:
    """The JSON says how to turn an image file into the graph's input (#16.12); following it step by step
    with onnxruntime gives what ``predict`` gives, on an image of another size than the network's."""
    from PIL import Image

    prep = json.loads(exported.with_suffix(".json").read_text())["preprocess"]
    assert (prep["color"], prep["dtype"], prep["layout"], prep["value_range"]) == ("RGB", "float32", "NCHW", [0, 1])
    assert prep["resize"] == {
        "size": [32, 32],
        "mode": "bilinear",
        "align_corners": False,
        "antialias": False,
        "keep_aspect_ratio": False,
    }
    assert prep["normalization"]["inside_graph"] and len(prep["normalization"]["mean"]) == 3
    file = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(3).random((40, 50)) * 255).astype(np.uint8)).save(file)  # grey
    record = api.predict(run, [file], out=tmp_path / "preds")[0]

    pixels = np.asarray(Image.open(file).convert(prep["color"]), dtype=np.float32) / 255.0
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    resize = prep["resize"]
    image = torch.nn.functional.interpolate(
        image,
        size=tuple(resize["size"]),
        mode=resize["mode"],
        align_corners=resize["align_corners"],
        antialias=resize["antialias"],
    )
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    count, segmentation = session.run(["count", "segmentation"], {"image": image.numpy()})
    assert int(count[0].argmax()) == record["tasks"]["count"]["label"]
    classes = segmentation[0].argmax(axis=0)
    rows, cols = np.arange(40) * classes.shape[0] // 40, np.arange(50) * classes.shape[1] // 50
    mask = np.array(Image.open(tmp_path / "preds" / record["tasks"]["segmentation"]["mask"]))
    assert mask.shape == (40, 50) and (classes[rows][:, cols] == mask).mean() > 0.99
