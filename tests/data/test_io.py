"""read_image: RGB float tensors in [0, 1]; missing or undecodable files raise DataError naming the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mtlvision.data.io import ImageTooLarge, read_array, read_image, read_image_resized
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


def test_16_bit_grey_png_keeps_every_level(tmp_path: Path) -> None:
    """1024 grey levels of a 16-bit PNG stay 1024 levels, scaled by 65535 (convert("RGB") clipped them to 5)."""
    levels = (np.arange(1024, dtype=np.uint16) * 64).reshape(32, 32)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode == "I;16"
    tensor = read_image(path)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert len(torch.unique(tensor)) == 1024
    np.testing.assert_allclose(tensor[0].numpy(), levels / 65535.0, atol=1e-6)
    assert torch.equal(tensor[0], tensor[2])
    resized, original = read_image_resized(path, (16, 16))
    assert original == (32, 32) and len(torch.unique(resized)) > 200 and 0 <= resized.min() <= resized.max() <= 1


def test_16_bit_colour_png_is_reduced_not_clipped(tmp_path: Path) -> None:
    """PIL keeps the 8 high bits of a 16-bit RGB PNG: 40000 / 65535 reads as 156 / 255, not 1.0."""
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(4, 4, bit_depth=16, colour_type=2, raw=np.full((4, 4, 3), 40000, ">u2").tobytes()))
    assert read_image(path)[:, 0, 0].tolist() == pytest.approx([156 / 255.0] * 3)


def test_float_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(DataError, match=r"float\.tif.*32-bit float"):
        read_image(path)


def png_bytes(
    width: int, height: int, bit_depth: int = 8, colour_type: int = 0, raw: bytes | None = None, rows: int | None = None
) -> bytes:
    """A PNG file written chunk by chunk; ``raw`` holds the pixel bytes (filter bytes are added), ``rows``
    limits the image data to that many rows of zeros (a truncated stream) when ``raw`` is None."""
    channels = {0: 1, 2: 3}[colour_type]
    stride = width * channels * bit_depth // 8
    if raw is None:
        data = b"".join(b"\x00" + bytes(stride) for _ in range(rows if rows is not None else height))
    else:
        data = b"".join(b"\x00" + raw[r * stride : (r + 1) * stride] for r in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def test_huge_image_is_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few-KB PNG announcing 11000 x 11000 pixels is refused before any decoding (it only warned before)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(11000, 11000, rows=2))
    assert path.stat().st_size < 2000

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(
        ImageTooLarge,
        match=r"bomb\.png: the image is 11000 x 11000 = 121,000,000 pixels, above data\.max_pixels = 50,000,000",
    ):
        read_image(path)
    with pytest.raises(ImageTooLarge, match="bomb.png"):
        read_array(path)
    with pytest.raises(ImageTooLarge, match="bomb.png"):
        read_image_resized(path, (32, 32))


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(path)
    assert read_image(path, max_pixels=600).shape == (3, 20, 30)
    with pytest.raises(ImageTooLarge, match=r"20 x 30|30 x 20"):
        read_image(path, max_pixels=599)
    assert read_image(path, max_pixels=0).shape == (3, 20, 30)  # 0: no limit
