"""Small readers shared by the datasets: images (via PIL) and IDX arrays (the MNIST file format).

Images are opened lazily: PIL reads the header first, so the pixel count is checked against ``max_pixels``
(the ``data.max_pixels`` key of every dataset) *before* anything is decoded, and an image above it is
refused with :class:`ImageTooLarge` naming the file. A 100 KB PNG can announce 11000 x 11000 pixels and
decode to gigabytes; the default, :data:`DEFAULT_MAX_PIXELS`, is 50 megapixels: above any common camera
sensor up to 48 MP, and an image of that size already takes about 1 GB while it is decoded (3 bytes per
pixel as RGB, 12 as a float tensor, with a copy or two), per DataLoader worker.

Bit depth: 8-bit images are scaled by 255. 16-bit grey images (PIL modes ``I;16*``, and ``I`` with values in
0..65535) are read at full depth and scaled by 65535 (``convert("RGB")`` would clip them to 255, turning
1024 grey levels into a handful); 16-bit colour PNGs are reduced by PIL to their 8 high bits (rounded, never
clipped). 32-bit float images and 32-bit integer images with values above 65535 are refused, since their
scale is unknown. Label maps are read by :func:`read_array` with their integer values kept as stored.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from mtlvision.errors import DataError

DEFAULT_MAX_PIXELS = 50_000_000
"""Default ``data.max_pixels``: images with more pixels are refused before decoding (see the module docstring)."""

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

T = TypeVar("T")


class ImageTooLarge(DataError):
    """An image file announces more pixels than ``data.max_pixels``; it was not decoded."""

    kind = "too_large"


def with_image(path: str | Path, decode: Callable[[Image.Image], T], max_pixels: int = DEFAULT_MAX_PIXELS) -> T:
    """``decode(image)`` on the opened file, once its header says it has at most ``max_pixels`` pixels (0: no
    limit). A missing, corrupt, truncated or oversized file raises :class:`DataError` naming it."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit comes first
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels and width * height > max_pixels:
                    raise ImageTooLarge(
                        f"{path}: the image is {width} x {height} = {width * height:,} pixels, above "
                        f"data.max_pixels = {max_pixels:,}; it was not decoded. Downscale or remove the file, or "
                        "raise data.max_pixels if images of that size are meant."
                    )
                return decode(image)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found.") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{path}: the image is larger than Pillow's safety limit ({exc}); not decoded.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode the image ({exc}). Replace or remove the file.") from None


def _sixteen_bit(image: Image.Image, path: Path) -> np.ndarray | None:
    """The grey values of a 16-bit (or 32-bit integer) image scaled to [0, 1], or None for 8-bit modes."""
    if image.mode in SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"{path}: a 32-bit integer image with values {values.min()}..{values.max()} (beyond "
                "16 bits); its scale is unknown. Save images with 8 or 16 bits per channel."
            )
        return values.astype(np.float32) / 65535.0
    if image.mode == "F":
        raise DataError(
            f"{path}: a 32-bit float image; its scale is unknown. Save images with 8 or 16 bits per channel."
        )
    return None


def _grey_to_rgb(grey: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))[None].repeat(3, 1, 1)


def decode_rgb(image: Image.Image, path: Path) -> Tensor:
    """An opened image as float32 ``[3, H, W]`` in ``[0, 1]`` at its full bit depth (see the module docstring)."""
    grey = _sixteen_bit(image, path)
    if grey is not None:
        return _grey_to_rgb(grey)
    rgb = image.convert("RGB")  # forces a full decode, so truncated files fail here
    return pil_to_tensor(rgb).to(torch.float32).div_(255.0)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """Read an image file as float32 ``[3, H, W]`` in ``[0, 1]`` (grey and palette images become RGB; 16-bit
    grey is scaled by 65535); larger than ``max_pixels`` (0: no limit) is refused before decoding."""
    path = Path(path)
    return with_image(path, lambda image: decode_rgb(image, path), max_pixels)


def read_image_resized(
    path: str | Path, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Tensor, tuple[int, int]]:
    """The image resized (bilinear, by PIL) to ``size`` = (H, W) as float32 ``[3, H, W]`` in [0, 1], and its
    original (H, W). 16-bit grey images are resized at full depth."""
    path = Path(path)
    height, width = size

    def decode(image: Image.Image) -> tuple[Tensor, tuple[int, int]]:
        original = (image.size[1], image.size[0])
        if _sixteen_bit(image, path) is not None:
            grey = np.asarray(image.convert("F").resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
            return _grey_to_rgb(np.clip(grey / 65535.0, 0.0, 1.0)), original
        picture = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(picture, dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), original

    return with_image(path, decode, max_pixels)


def read_array(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The raw values of an image file used as a label map (8- or 16-bit, grey or RGB; palette images give
    their indices), without colour conversion or scaling; refused above ``max_pixels`` like images."""

    def decode(image: Image.Image) -> np.ndarray:
        if image.mode == "P":  # palette masks store class indices, not colours
            return np.asarray(image)
        return np.array(image)

    return with_image(path, decode, max_pixels)


# IDX type codes (third byte of the magic number) -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``): the array format of the MNIST distribution.

    The format (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a 4-byte magic number (two zero bytes,
    a type code, the number of dimensions), one big-endian uint32 per dimension, then the values in C order,
    big-endian. Parsed here directly because torchvision's reader is private API.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: IDX file not found.") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the IDX file ({exc}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions announced).")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX data of shape {shape} needs {expected} bytes but the file holds {len(raw) - header}"
            " (truncated or corrupt)."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
