"""A tiny run of the scenes with every task kind (classification, multi-label, segmentation, depth, normals,
detection), trained for one epoch and exported to ONNX, served by the tests of this folder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlvision import api

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

KINDS = {
    "count": "classification",
    "colors": "multilabel",
    "segmentation": "segmentation",
    "depth": "depth",
    "normals": "normals",
    "detection": "detection",
}


@pytest.fixture(scope="session")
def served_run(six_task_run: Path) -> Path:
    return six_task_run


@pytest.fixture(scope="session")
def exported_run(served_run: Path) -> Path:
    """The run with its ONNX graph (``model.onnx``), for the onnx backend."""
    if not (served_run / "model.onnx").is_file():
        api.export(served_run)
    return served_run


def png_bytes(height: int, width: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A random image of that size as PNG bytes."""
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
