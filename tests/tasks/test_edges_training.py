"""The scenes_dense preset (segmentation, depth, normals, edges) end to end at a tiny size: it trains and
reports odsF, its ONNX graph gives the edge logits PyTorch gives, and predict writes the edge maps."""

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


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edges-run")
    assert main(["train", "scenes_dense", "--set", *TINY_RUN, "--out", str(out), "--name", "dense"]) == 0
    return out / "dense"


def test_the_preset_trains_the_four_dense_tasks_and_reports_ods_f(run: Path) -> None:
    report = json.loads((run / "metrics.json").read_text())
    assert list(report["metrics"]) == ["segmentation", "depth", "normals", "edges"]
    assert 0.0 <= report["metrics"]["edges"]["odsF"] <= 1.0


def test_predict_writes_the_edge_probability_and_map(run: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    assert main(["predict", str(run), str(tmp_path / "photo.png"), "--out", str(tmp_path / "preds")]) == 0
    record = json.loads((tmp_path / "preds" / "photo.json").read_text())["tasks"]["edges"]
    probability = np.load(tmp_path / "preds" / record["probability"])
    edges = np.array(Image.open(tmp_path / "preds" / record["edges"]))
    assert probability.shape == edges.shape == (20, 30)  # at the image's own size
    np.testing.assert_array_equal(edges, (probability >= 0.5).astype(np.uint8))
    assert record["edge_pixels"] == int(edges.sum())


def test_the_onnx_graph_gives_the_edge_logits(run: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["export", str(run)]) == 0
    model, _ = api.load_model(run)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    session = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    (edges,) = session.run(["edges"], {"image": images.numpy()})
    with torch.no_grad():
        want = model(images)["edges"].numpy()
    assert edges.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(edges, want, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(want).max()))
