"""Drawing helpers: image conversion, palette, overlays, colour maps and text."""

from __future__ import annotations

import numpy as np
import pytest

from mtlvision.tasks.drawing import (
    colourise,
    draw_text,
    overlay_classes,
    palette,
    resize_bilinear,
    resize_nearest,
    to_rgb_uint8,
)


def test_to_rgb_uint8_accepts_grey_float_and_rgba() -> None:
    grey = np.linspace(0, 1, 6).reshape(2, 3)
    rgb = to_rgb_uint8(grey)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 2].tolist() == [255, 255, 255]
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert to_rgb_uint8(rgba).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="image"):
        to_rgb_uint8(np.zeros((2, 2, 5)))


def test_palette_is_distinct_and_stable() -> None:
    colours = palette(512)
    assert colours.dtype == np.uint8 and colours.shape == (512, 3)
    assert len({tuple(c) for c in colours}) == 512
    assert colours[0].tolist() == [0, 0, 0] and colours[1].tolist() == [128, 0, 0]
    assert np.array_equal(palette(21), colours[:21])


def test_resizing() -> None:
    classes = np.array([[0, 1], [2, 3]])
    assert resize_nearest(classes, 4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    ramp = np.array([[0.0, 1.0]], dtype=np.float32)
    wide = resize_bilinear(ramp, 1, 4)
    assert wide.shape == (1, 4) and np.all(np.diff(wide[0]) >= 0)


def test_overlay_colourise_and_text() -> None:
    image = np.full((6, 6, 3), 100, np.uint8)
    mask = np.zeros((3, 3), np.int64)
    mask[0] = 1
    blended = overlay_classes(image, mask, alpha=0.5)
    assert blended.shape == (6, 6, 3)
    assert blended[0, 0].tolist() == [114, 50, 50]  # half of (100,100,100) and half of (128,0,0)
    assert blended[5, 5].tolist() == [50, 50, 50]

    depth = np.array([[1.0, 2.0], [3.0, 0.0]])
    coloured = colourise(depth, valid=depth > 0)
    assert coloured.shape == (2, 2, 3) and coloured.dtype == np.uint8
    assert coloured[1, 1].tolist() == [0, 0, 0] and len({tuple(c) for c in coloured.reshape(-1, 3)}) == 4

    written = draw_text(np.zeros((64, 64, 3), np.uint8), ["hello"])
    assert written.shape == (64, 64, 3) and written.any()
