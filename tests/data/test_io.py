"""read_image: RGB float tensors in [0, 1]; missing or undecodable files raise DataError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlvision.data.io import read_image
from mtlvision.errors import DataError


@pytest.mark.parametrize(("mode", "suffix"), [("RGB", ".png"), ("L", ".png"), ("RGBA", ".png"), ("RGB", ".jpg")])
def test_reads_rgb_float_in_unit_range(tmp_path: Path, mode: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path = tmp_path / f"a{suffix}"
    image.save(path)
    tensor = read_image(path)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 5, 7)
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-6)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.png.*not found"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("content", [b"not an image at all", b""])
def test_undecodable_file_names_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"broken\.png.*cannot decode"):
        read_image(path)


def test_truncated_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=r"cut\.jpg.*cannot decode"):
        read_image(path)
