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
    resized = Image.fromarray(array.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
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


#: the smallest font drawn (pixels); a longer text is wrapped rather than made smaller than this
MIN_FONT = 10


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def fit_font(lines: Sequence[str], width: int, size: int) -> tuple[Font, list[str]]:
    """The largest font of at most ``size`` pixels (not below :data:`MIN_FONT`) at which every line fits in
    ``width`` pixels, and the lines, wrapped where even that font is too wide: text is never cut off."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for candidate in range(max(size, MIN_FONT), MIN_FONT - 1, -1):
        font = ImageFont.load_default(size=candidate)
        if all(measure.textlength(line, font=font) <= width for line in lines):
            return font, list(lines)
    font = ImageFont.load_default(size=MIN_FONT)
    wrapped: list[str] = []
    for line in lines:
        while line:
            cut = len(line)
            while cut > 1 and measure.textlength(line[:cut], font=font) > width:
                cut -= 1
            wrapped.append(line[:cut])
            line = line[cut:]
    return font, wrapped


def draw_text(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Write ``lines`` in the top-left corner of ``image`` on a dark box, in a font scaled to the image and
    made smaller (then wrapped) so that every line is shown whole."""
    picture = Image.fromarray(to_rgb_uint8(image))
    if not lines:
        return np.asarray(picture)
    font, lines = fit_font(lines, picture.width - 6, max(MIN_FONT, picture.height // 14))
    canvas = ImageDraw.Draw(picture)
    text = "\n".join(lines)
    _, _, right, bottom = canvas.multiline_textbbox((2, 2), text, font=font, spacing=2)
    canvas.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
    canvas.multiline_text((2, 2), text, fill=(255, 255, 255), font=font, spacing=2)
    return np.asarray(picture)


# ---------------------------------------------------------------------------------------- prediction pictures
#: the shorter side of a picture panel is at least this many pixels (small inputs are enlarged) ...
PANEL_MIN = 256
#: ... and its longer side at most this many (large inputs are reduced), unless that breaks PANEL_MIN
PANEL_MAX = 1024


def display_size(height: int, width: int) -> tuple[int, int]:
    """The size at which an ``height x width`` image is drawn in a prediction picture: enlarged so that its
    shorter side is at least :data:`PANEL_MIN` pixels, or reduced so that its longer side is at most
    :data:`PANEL_MAX` (never below PANEL_MIN), keeping the aspect ratio."""
    scale = 1.0
    if min(height, width) < PANEL_MIN:
        scale = PANEL_MIN / min(height, width)
    elif max(height, width) > PANEL_MAX:
        scale = max(PANEL_MAX / max(height, width), PANEL_MIN / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An RGB picture resized for display: nearest neighbour when enlarging (pixels stay sharp and true),
    PIL's antialiased bilinear when reducing."""
    rgb = to_rgb_uint8(image)
    if rgb.shape[:2] == (height, width):
        return rgb
    if height >= rgb.shape[0] and width >= rgb.shape[1]:
        return resize_nearest(rgb, height, width)
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def compose_panels(tiles: Sequence[tuple[str, np.ndarray]]) -> Image.Image:
    """The tiles side by side, each under its title (shown whole: smaller font, then wrapped, if needed)."""
    pictures = [(title, to_rgb_uint8(tile)) for title, tile in tiles]
    size = 18
    titles = [fit_font([title], tile.shape[1] - 8, size) for title, tile in pictures]
    line = size + 6
    header = max(len(wrapped) for _, wrapped in titles) * line + 4
    height = max(tile.shape[0] for _, tile in pictures) + header
    canvas = Image.new("RGB", (sum(tile.shape[1] for _, tile in pictures), height), "white")
    pen = ImageDraw.Draw(canvas)
    x = 0
    for (_, tile), (font, wrapped) in zip(pictures, titles, strict=True):
        canvas.paste(Image.fromarray(tile), (x, header))
        pen.multiline_text((x + 4, 3), "\n".join(wrapped), fill="black", font=font, spacing=6)
        x += tile.shape[1]
    return canvas
