"""``/predict``, ``/model`` and ``/health`` on a run with every task kind: results at the image's own size,
the same as ``mtlvision predict`` writes, the same through both backends, and concurrent requests batched."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mtlvision import api
from mtlvision.serving.app import create_app
from mtlvision.serving.settings import ServeSettings

from .conftest import KINDS, png_bytes


@pytest.fixture(scope="module")
def clients(exported_run):
    with (
        TestClient(api.serve_app(exported_run)) as torch_client,
        TestClient(api.serve_app(exported_run, backend="onnx")) as onnx_client,
    ):
        yield {"torch": torch_client, "onnx": onnx_client}


def _png(field: dict) -> np.ndarray:
    assert field["encoding"] == "png"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(field["data"]))))


def _raw(field: dict) -> np.ndarray:
    assert field["encoding"] == "raw" and field["dtype"] == "float32"
    return np.frombuffer(base64.b64decode(field["data"]), dtype="<f4").reshape(field["shape"])


def _rle(field: dict) -> np.ndarray:
    return np.repeat(field["values"], field["counts"]).reshape(field["size"])


def test_model_describes_tasks_input_and_preprocessing(clients) -> None:
    described = clients["torch"].get("/model").json()
    assert {name: task["kind"] for name, task in described["tasks"].items()} == KINDS
    assert described["tasks"]["segmentation"]["class_names"][0] == "background"
    assert described["input_size"] == [32, 32]
    assert described["preprocess"]["resize"]["size"] == [32, 32]
    assert described["limits"]["max_images"] == 16
    assert clients["torch"].get("/health").json()["status"] == "ok"


def test_every_task_kind_at_the_images_own_size(clients, served_run, tmp_path) -> None:
    data = png_bytes(40, 50, seed=1)
    reply = clients["torch"].post("/predict?maps=raw", files={"image": ("wide.png", data, "image/png")})
    assert reply.status_code == 200, reply.text
    image = reply.json()["images"][0]
    assert image["size"] == [40, 50] and image["network_size"] == [32, 32]
    tasks = image["tasks"]
    assert set(tasks) == set(KINDS)
    probabilities = tasks["count"]["probabilities"]
    assert abs(sum(probabilities.values()) - 1) < 1e-4 and tasks["count"]["class_name"] in probabilities
    assert set(tasks["colors"]["labels"]) <= set(tasks["colors"]["scores"])
    mask = _png(tasks["segmentation"]["mask"])
    assert mask.shape == (40, 50)
    assert sum(tasks["segmentation"]["class_histogram"].values()) == 40 * 50
    depth = _raw(tasks["depth"]["depth"])
    assert depth.shape == (40, 50) and np.isclose(depth.min(), tasks["depth"]["min"])
    normals = _raw(tasks["normals"]["normals"])
    assert normals.shape == (40, 50, 3) and np.allclose(np.linalg.norm(normals, axis=-1), 1, atol=1e-4)
    detection = tasks["detection"]
    assert len(detection["boxes"]) == len(detection["scores"]) == len(detection["class_names"])
    for x1, y1, x2, y2 in detection["boxes"]:
        assert 0 <= x1 <= x2 <= 50 and 0 <= y1 <= y2 <= 40
    timings = image["timings_ms"]
    assert timings["batch_size"] == 1 and timings["model"] > 0

    # the same results as `mtlvision predict` writes for that file
    (tmp_path / "wide.png").write_bytes(data)
    record = api.predict(served_run, [tmp_path / "wide.png"], out=tmp_path / "preds")[0]["tasks"]
    assert record["count"]["class_name"] == tasks["count"]["class_name"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "preds" / record["segmentation"]["mask"])), mask)
    assert np.allclose(np.load(tmp_path / "preds" / record["depth"]), depth, atol=1e-6)
    assert record["detection"]["boxes"] == detection["boxes"]


def test_dense_formats_agree(clients) -> None:
    data = {"image": ("a.png", png_bytes(24, 20, seed=2), "image/png")}
    raw = clients["torch"].post("/predict?maps=raw&masks=rle", files=data).json()["images"][0]["tasks"]
    png = clients["torch"].post("/predict?view=1", files=data).json()["images"][0]["tasks"]
    none = clients["torch"].post("/predict?maps=none&masks=none", files=data).json()["images"][0]["tasks"]
    assert np.array_equal(_rle(raw["segmentation"]["mask"]), _png(png["segmentation"]["mask"]))
    depth, low, high = _raw(raw["depth"]["depth"]), png["depth"]["min"], png["depth"]["max"]
    assert np.allclose(low + _png(png["depth"]["depth"]) / 65535 * (high - low), depth, atol=(high - low) / 65535)
    assert np.allclose(_png(png["normals"]["normals"]) / 255 * 2 - 1, _raw(raw["normals"]["normals"]), atol=1 / 255)
    assert "mask" not in none["segmentation"] and "depth" not in none["depth"] and "normals" not in none["normals"]
    views = {name for name, result in png.items() if "view" in result}
    assert views == {"segmentation", "depth", "normals"}
    assert png["depth"]["view"].startswith("data:image/png;base64,")


def test_both_backends_give_the_same_results(clients) -> None:
    files = [("image", (f"{i}.png", png_bytes(32 + 8 * i, 30, seed=10 + i), "image/png")) for i in range(3)]
    replies = {name: c.post("/predict?maps=raw&masks=rle", files=files).json() for name, c in clients.items()}
    assert [len(r["images"]) for r in replies.values()] == [3, 3]
    for mine, theirs in zip(replies["torch"]["images"], replies["onnx"]["images"]):
        a, b = mine["tasks"], theirs["tasks"]
        assert a["count"]["class_name"] == b["count"]["class_name"]
        assert np.allclose(
            list(a["count"]["probabilities"].values()), list(b["count"]["probabilities"].values()), atol=1e-4
        )
        assert a["colors"]["labels"] == b["colors"]["labels"]
        assert np.allclose(list(a["colors"]["scores"].values()), list(b["colors"]["scores"].values()), atol=1e-4)
        assert np.array_equal(_rle(a["segmentation"]["mask"]), _rle(b["segmentation"]["mask"]))
        assert np.allclose(_raw(a["depth"]["depth"]), _raw(b["depth"]["depth"]), atol=1e-4)
        assert np.allclose(_raw(a["normals"]["normals"]), _raw(b["normals"]["normals"]), atol=1e-4)
        assert a["detection"]["labels"] == b["detection"]["labels"]
        assert np.allclose(a["detection"]["boxes"], b["detection"]["boxes"], atol=1e-2)
        assert np.allclose(a["detection"]["scores"], b["detection"]["scores"], atol=1e-3)


def test_concurrent_requests_are_batched_and_each_gets_its_own_result(served_run) -> None:
    """Twelve clients at once, batches of up to 4 gathered for 200 ms: fewer forward passes than images,
    and each client's result is the one it gets alone."""
    app = create_app(served_run, ServeSettings(max_batch=4, max_wait_ms=200))
    images = [png_bytes(32, 32, seed=100 + i) for i in range(12)]

    async def scenario() -> tuple[list[dict], list[dict]]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:

            async def one(data: bytes) -> dict:
                reply = await c.post("/predict?masks=rle", files={"image": ("x.png", data, "image/png")})
                assert reply.status_code == 200, reply.text
                return reply.json()["images"][0]

            together = await asyncio.gather(*(one(d) for d in images))
            alone = [await one(d) for d in images]
            health = (await c.get("/health")).json()
        return together, alone, health

    together, alone, health = asyncio.run(scenario())
    sizes = [r["timings_ms"]["batch_size"] for r in together]
    assert max(sizes) > 1 and max(sizes) <= 4
    assert health["images"] == 24 and health["batches"] < 24
    for a, b in zip(together, alone):
        assert a["tasks"]["count"]["label"] == b["tasks"]["count"]["label"]
        mine, theirs = a["tasks"]["count"]["probabilities"], b["tasks"]["count"]["probabilities"]
        assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-5)
        assert a["tasks"]["segmentation"]["mask"] == b["tasks"]["segmentation"]["mask"]
        assert json.dumps(a["tasks"]["detection"]["labels"]) == json.dumps(b["tasks"]["detection"]["labels"])
