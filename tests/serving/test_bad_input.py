"""Bad input (#22.3): a non-image, a truncated image, a decompression bomb, an oversize upload, a wrong content
type, too many images, ... each get a 4xx with a JSON error naming the problem, and the service keeps
serving (a good request after each is answered)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mtlvision import api
from mtlvision.errors import ConfigError
from mtlvision.serving.settings import ServeSettings
from mtlvision.serving.uploads import ServeError, read_body

from .conftest import png_bytes

LIMITS = {"max_images": 3, "max_upload_bytes": 200_000, "max_pixels": 100_000}


@pytest.fixture(scope="module")
def client(served_run):
    with TestClient(api.serve_app(served_run, **LIMITS)) as client:
        yield client


def bomb(width: int, height: int) -> bytes:
    """A PNG of a few kilobytes that decodes to ``width x height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(buffer, format="TIFF")
    return buffer.getvalue()


GOOD = png_bytes(20, 20, seed=3)
CASES = {
    "not an image": ({"files": {"image": ("notes.png", b"hello, not a picture", "image/png")}}, 422, "not_an_image"),
    "truncated": ({"files": {"image": ("cut.png", GOOD[: len(GOOD) // 2], "image/png")}}, 422, "corrupt_image"),
    "empty": ({"files": {"image": ("empty.png", b"", "image/png")}}, 422, "empty_file"),
    "bomb": ({"files": {"image": ("bomb.png", bomb(2000, 2000), "image/png")}}, 413, "image_too_large"),
    "float image": ({"files": {"image": ("f.tif", float_tiff(), "image/tiff")}}, 422, "unsupported_image"),
    "oversize upload": (
        {"files": {"image": ("big.png", png_bytes(300, 300, seed=4), "image/png")}},
        413,
        "upload_too_large",
    ),
    "json body": ({"json": {"image": "street.png"}}, 415, "unsupported_media_type"),
    "text part": ({"files": {"image": ("a.txt", b"text", "text/plain")}}, 415, "unsupported_media_type"),
    "too many images": (
        {"files": [("image", (f"{i}.png", GOOD, "image/png")) for i in range(4)]},
        400,
        "too_many_images",
    ),
    "no image field": ({"files": {"photo": ("a.png", GOOD, "image/png")}}, 400, "no_image"),
    "text in the image field": (
        {"data": {"image": "street.png"}, "files": {"x": ("a", b"", "image/png")}},
        400,
        "not_a_file",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_with_its_problem_named_and_the_service_keeps_serving(client, case) -> None:
    request, status, code = CASES[case]
    reply = client.post("/predict", **request)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]
    name = next((f[0] for f in dict(request.get("files") or {}).values() if isinstance(f, tuple)), None)
    if status == 422 or code == "image_too_large":
        assert name in error["message"]  # the file is named
    good = client.post("/predict", files={"image": ("good.png", GOOD, "image/png")})
    assert good.status_code == 200 and set(good.json()["images"][0]["tasks"])


def test_the_limits_are_named_with_their_values(client) -> None:
    message = client.post("/predict", files={"image": ("bomb.png", bomb(2000, 2000), "image/png")}).json()["error"]
    assert "2000 x 2000" in message["message"] and "100,000" in message["message"]
    many = client.post("/predict", files=[("image", (f"{i}.png", GOOD, "image/png")) for i in range(5)])
    assert "5 images" in many.json()["error"]["message"] and "3 per request" in many.json()["error"]["message"]


def test_the_default_pixel_limit_refuses_a_bomb_before_decoding(served_run) -> None:
    side = 4097  # just above the default 4096 x 4096
    assert side * side > ServeSettings().max_pixels
    with TestClient(api.serve_app(served_run)) as client:
        reply = client.post("/predict", files={"image": ("bomb.png", bomb(side, side), "image/png")})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "image_too_large"


def test_a_body_without_length_is_cut_at_the_limit() -> None:
    """A chunked body (no Content-Length) is refused as soon as it passes the limit, not read to its end."""
    read = []

    async def chunks():
        for _ in range(100):
            read.append(1)
            yield b"x" * 1000

    settings = ServeSettings(max_upload_bytes=5_500)
    with pytest.raises(ServeError) as refused:
        asyncio.run(read_body({}, chunks, settings))
    assert refused.value.status == 413 and len(read) == 6


def test_bad_parameters_and_paths_get_json_errors(client) -> None:
    reply = client.post("/predict?masks=jpeg", files={"image": ("good.png", GOOD, "image/png")})
    assert reply.status_code == 400 and "masks='jpeg'" in reply.json()["error"]["message"]
    reply = client.post("/predict?view=maybe", files={"image": ("good.png", GOOD, "image/png")})
    assert reply.status_code == 422 and "view" in reply.json()["error"]["message"]
    assert client.get("/nowhere").json()["error"]["code"] == "http_error"


@pytest.mark.parametrize(
    ("settings", "named"),
    [({"backend": "tensorrt"}, "backend"), ({"max_batch": 0}, "max_batch"), ({"max_wait_ms": -1}, "max_wait_ms")],
)
def test_bad_settings_are_refused_before_serving(settings, named) -> None:
    with pytest.raises(ConfigError, match=named):
        ServeSettings(**settings)


def test_the_onnx_backend_without_an_export_says_how_to_make_one(served_run, tmp_path) -> None:
    with pytest.raises(ConfigError, match="mtlvision export"):
        api.serve_app(served_run, backend="onnx", onnx=str(tmp_path / "missing.onnx"))
