"""Drawing helpers shared by the tasks' ``draw`` methods: image conversion, a class palette, overlays, text
and colour maps. Every function returns an ``H x W x 3`` uint8 array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """An ``H x W x 3`` uint8 copy of ``image`` (``H x W``, ``H x W x 1/3/4``; uint8, or floats in [0, 1])."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H x W (x 1, 3 or 4) image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def palette(num_colours: int) -> np.ndarray:
    """``[num_colours, 3]`` uint8 colours, distinct for every index below 2**24.

    The PASCAL VOC scheme: the bits of the index are spread over the three channels, most significant
    first, so that neighbouring indices get very different colours; index 0 is black.
    """
    indices = np.arange(num_colours, dtype=np.int64)
    colours = np.zeros((num_colours, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((indices >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """``array`` (``H x W`` or ``H x W x C``, any dtype) resized to ``height x width`` by nearest neighbour."""
    rows = (np.arange(height) * array.shape[0] // height).clip(0, array.shape[0] - 1)
    cols = (np.arange(width) * array.shape[1] // width).clip(0, array.shape[1] - 1)
    return array[rows][:, cols]


def resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float ``H x W`` map resized to ``height x width`` bilinearly (PIL's 32-bit float mode)."""
    if array.shape == (height, width):
        return array.astype(np.float32)
    resized = Image.fromarray(array.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def overlay_classes(image: np.ndarray, class_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colour of each pixel's class over ``image`` (the map is resized to the image)."""
    rgb = to_rgb_uint8(image)
    height, width = rgb.shape[:2]
    classes = resize_nearest(np.asarray(class_map), height, width).astype(np.int64)
    colours = palette(int(classes.max()) + 1)[classes]
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def colourise(values: np.ndarray, cmap: str = "viridis", valid: np.ndarray | None = None) -> np.ndarray:
    """Map a float ``H x W`` array through a matplotlib colour map scaled to its (valid) min..max.

    Pixels outside ``valid`` are drawn black.
    """
    # matplotlib is imported here, not at module level, so that importing the tasks stays light.
    from matplotlib import colormaps

    data = np.asarray(values, dtype=np.float64)
    mask = np.isfinite(data) if valid is None else (np.asarray(valid, dtype=bool) & np.isfinite(data))
    low, high = (float(data[mask].min()), float(data[mask].max())) if mask.any() else (0.0, 1.0)
    scaled = (data - low) / (high - low) if high > low else np.zeros_like(data)
    rgb = colormaps[cmap](np.clip(np.nan_to_num(scaled), 0.0, 1.0), bytes=True)[..., :3]
    rgb[~mask] = 0
    return np.ascontiguousarray(rgb)


def draw_text(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Write ``lines`` in the top-left corner of ``image`` on a dark box (font scaled to the image)."""
    picture = Image.fromarray(to_rgb_uint8(image))
    if not lines:
        return np.asarray(picture)
    size = max(8, picture.height // 14)
    font = ImageFont.load_default(size=size)
    canvas = ImageDraw.Draw(picture)
    text = "\n".join(lines)
    _, _, right, bottom = canvas.multiline_textbbox((2, 2), text, font=font, spacing=2)
    canvas.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    canvas.multiline_text((2, 2), text, fill=(255, 255, 255), font=font, spacing=2)
    return np.asarray(picture)
