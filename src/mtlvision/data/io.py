"""Small readers shared by the datasets: images (via PIL) and IDX arrays (the MNIST file format)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from mtlvision.errors import DataError


def read_image(path: str | Path) -> Tensor:
    """Read an image file as float32 ``[3, H, W]`` in ``[0, 1]`` (grey and palette images become RGB)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # forces a full decode, so truncated files fail here
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found.") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode the image ({exc}). Replace or remove the file.") from None
    return pil_to_tensor(rgb).to(torch.float32).div_(255.0)


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
