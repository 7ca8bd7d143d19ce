"""The scenes_keypoints preset end to end at a tiny size: it trains and reports keypoint AP, predict writes the
instances with their keypoints, and the ONNX graph gives the head's maps PyTorch gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision import api
from mtlvision.cli import main
from tests.tasks.tiny_run import TINY_RUN

TINY = [*TINY_RUN, "tasks=[{name: keypoints, score_threshold: 0.0, max_instances: 3}]"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keypoints-run")
    assert main(["train", "scenes_keypoints", "--set", *TINY, "--out", str(out), "--name", "kp"]) == 0
    return out / "kp"


def test_the_preset_trains_and_reports_keypoint_ap(run: Path) -> None:
    report = json.loads((run / "metrics.json").read_text())
    assert list(report["metrics"]) == ["keypoints"]
    assert {"ap", "ap50", "ap75"} <= set(report["metrics"]["keypoints"])
    assert all(0.0 <= report["metrics"]["keypoints"][k] <= 1.0 for k in ("ap", "ap50", "ap75"))


def test_predict_writes_instances_with_keypoints_at_the_images_size(run: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 48, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    assert main(["predict", str(run), str(tmp_path / "photo.png"), "--out", str(tmp_path / "preds")]) == 0
    record = json.loads((tmp_path / "preds" / "photo.json").read_text())["tasks"]["keypoints"]
    assert record["keypoint_names"] == ["top", "right", "bottom", "left"]
    assert len(record["scores"]) == len(record["boxes"]) == len(record["keypoints"]) == 3  # max_instances
    model, _ = api.load_model(run)
    image = torch.from_numpy(np.array(Image.open(tmp_path / "photo.png"))).permute(2, 0, 1).float()[None] / 255
    resized = torch.nn.functional.interpolate(image, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        (decoded,) = model.tasks["keypoints"].decode(model(resized)["keypoints"])
    # at the image's own size: x scaled by 48 / 32, y by 20 / 32
    want = np.array(decoded["keypoints"])[..., :2] * [48 / 32, 20 / 32]
    np.testing.assert_allclose(np.array(record["keypoints"])[..., :2], want, atol=0.02)
    assert (tmp_path / "preds" / "photo.png").is_file()


def test_the_onnx_graph_gives_the_keypoint_maps(run: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["export", str(run)]) == 0
    model, _ = api.load_model(run)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    session = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    names = ["center", "center_offset", "size", "joints", "keypoint_heatmaps", "keypoint_offset"]
    got = session.run([f"keypoints.{n}" for n in names], {"image": images.numpy()})
    with torch.no_grad():
        want = model(images)["keypoints"]
    for name, theirs in zip(names, got, strict=True):
        reference = want[name].numpy()
        np.testing.assert_allclose(theirs, reference, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(reference).max()))
    description = json.loads((run / "model.json").read_text())["tasks"]["keypoints"]
    assert description["keypoint_names"] == ["top", "right", "bottom", "left"] and want["stride"] == 4
