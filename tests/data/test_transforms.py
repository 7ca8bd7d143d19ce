"""Joint transforms: every target follows the image by its kind, with one random draw per sample."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlvision.data.transforms import KIND_OPS, AugmentParams, TargetSpec, build_transforms
from mtlvision.errors import ConfigError
from mtlvision.tasks.base import TargetKind as K

KINDS = {"seg": K.MASK, "depth": K.DEPTH, "normals": K.NORMALS, "boxes": K.BOXES, "count": K.LABEL}
FAST = settings(max_examples=25, deadline=None)


def scene(height: int, width: int, box: tuple[int, int, int, int], near: float = 2.0, far: float = 5.0) -> dict:
    """One object (class 1, depth ``near``, normal facing the camera) on a background (class 0, ``far``)."""
    x1, y1, x2, y2 = box
    seg = torch.zeros(height, width, dtype=torch.int64)
    seg[y1:y2, x1:x2] = 1
    depth = torch.full((1, height, width), far)
    depth[:, y1:y2, x1:x2] = near
    normals = torch.zeros(3, height, width)
    normals[:, :, :] = torch.tensor([0.6, 0.0, 0.8])[:, None, None]
    normals[:, y1:y2, x1:x2] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    return {
        "image": torch.rand(3, height, width),
        "targets": {
            "seg": seg,
            "depth": depth,
            "normals": normals,
            "boxes": {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1])},
            "count": torch.tensor(1),
        },
        "valid": dict.fromkeys(KINDS, True),
        "id": "test/0",
    }


boxes = st.tuples(st.integers(2, 14), st.integers(2, 10), st.integers(6, 14), st.integers(6, 10)).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
)


def test_every_target_kind_has_its_ops() -> None:
    assert set(KIND_OPS) == set(K)


@FAST
@given(box=boxes, seed=st.integers(0, 2**31), zoom=st.floats(0.6, 1.8))
def test_box_mask_and_depth_stay_aligned(box: tuple[int, int, int, int], seed: int, zoom: float) -> None:
    transform = build_transforms(
        {"hflip": 0.5, "scale": [zoom, zoom], "min_box_visibility": 0.0, "min_box_size": 0.0},
        KINDS,
        train=True,
        generator=torch.Generator().manual_seed(seed),
    )
    out = transform(scene(32, 40, box))["targets"]
    seg, depth = out["seg"], out["depth"][0]
    assert seg.shape == depth.shape == (32, 40)
    obj = seg == 1
    if out["boxes"]["boxes"].shape[0] == 0:
        assert obj.sum() <= 4  # only a sliver of the object can remain when its box was dropped
        return
    x1, y1, x2, y2 = out["boxes"]["boxes"][0].tolist()
    ys, xs = torch.nonzero(obj, as_tuple=True)
    if len(xs) == 0:  # a sliver narrower than a pixel covers no pixel centre (min_box_size drops these)
        assert min(x2 - x1, y2 - y1) < 1.0
        return
    # the mask region fills its box up to one pixel of resampling error at each side
    assert abs(xs.min().item() - x1) <= 1 and abs(xs.max().item() + 1 - x2) <= 1
    assert abs(ys.min().item() - y1) <= 1 and abs(ys.max().item() + 1 - y2) <= 1
    # depth is the object's depth divided by the zoom exactly where the mask says object
    assert torch.allclose(depth[obj], torch.full_like(depth[obj], 2.0 / zoom))
    background = seg == 0
    assert torch.allclose(depth[background], torch.full_like(depth[background], 5.0 / zoom))
    padded = seg == 255
    assert (depth[padded] == 0).all() and (out["normals"][:, padded] == 0).all()


@FAST
@given(seed=st.integers(0, 2**31), zoom=st.floats(0.5, 2.0), bilinear=st.booleans())
def test_normals_stay_unit_or_invalid(seed: int, zoom: float, bilinear: bool) -> None:
    normals = torch.randn(3, 24, 28)
    normals = normals / normals.norm(dim=0, keepdim=True)
    normals[:, 5:9, 3:20] = 0.0  # invalid pixels
    sample = {"image": torch.rand(3, 24, 28), "targets": {"n": normals}, "valid": {"n": True}, "id": "x"}
    transform = build_transforms(
        {"scale": [zoom, zoom], "hflip": 0.5, "depth_interpolation": "bilinear" if bilinear else "nearest"},
        {"n": K.NORMALS},
        train=True,
        generator=torch.Generator().manual_seed(seed),
    )
    out = transform(sample)["targets"]["n"]
    length = out.norm(dim=0)
    valid = length > 0
    assert torch.allclose(length[valid], torch.ones_like(length[valid]), atol=1e-5)
    assert valid.any()


def test_flip_mirrors_every_target_and_negates_normal_x() -> None:
    sample = scene(16, 20, (2, 3, 7, 9))
    sample["targets"]["normals"] = torch.nn.functional.normalize(torch.randn(3, 16, 20), dim=0)
    out = build_transforms({"hflip": 1.0}, KINDS, train=True)(sample)
    t, o = sample["targets"], out["targets"]
    assert torch.equal(out["image"], sample["image"].flip(-1))
    assert torch.equal(o["seg"], t["seg"].flip(-1))
    assert torch.equal(o["depth"], t["depth"].flip(-1))
    expected = t["normals"].flip(-1) * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
    assert torch.equal(o["normals"], expected)
    assert o["boxes"]["boxes"].tolist() == [[13.0, 3.0, 18.0, 9.0]]
    assert o["count"] is t["count"]


@FAST
@given(seed=st.integers(0, 2**31), zoom=st.floats(0.5, 1.6))
def test_ignore_pixels_never_become_labels(seed: int, zoom: float) -> None:
    seg = torch.randint(0, 4, (20, 24))
    seg[:, :12] = 255  # the left half is unlabelled
    sample = {"image": torch.rand(3, 20, 24), "targets": {"seg": seg}, "valid": {"seg": True}, "id": "x"}
    flip_seed = torch.Generator().manual_seed(seed)
    transform = build_transforms(
        {"scale": [zoom, zoom], "hflip": 0.0}, {"seg": K.MASK}, train=True, generator=flip_seed
    )
    out = transform(sample)["targets"]["seg"]
    assert set(out.unique().tolist()) <= set(seg.unique().tolist())
    # without a flip the ignore region stays on the left: no labelled pixel appears left of where it was
    cols_labelled = torch.nonzero(out != 255, as_tuple=True)[1]
    if zoom >= 1.0 and len(cols_labelled):
        assert cols_labelled.min() >= int(12 * zoom) - 1 - (round(24 * zoom) - 24)


def test_all_ignore_mask_stays_all_ignore() -> None:
    seg = torch.full((20, 24), 255, dtype=torch.int64)
    sample = {"image": torch.rand(3, 20, 24), "targets": {"seg": seg}, "valid": {"seg": False}, "id": "x"}
    for seed in range(5):
        t = build_transforms(
            {"scale": [0.5, 1.5], "hflip": 0.5, "crop": [16, 16]},
            {"seg": K.MASK},
            train=True,
            generator=torch.Generator().manual_seed(seed),
        )
        out = t(sample)["targets"]["seg"]
        assert out.shape == (16, 16) and (out == 255).all()


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_depth_divided_by_zoom_and_invalid_never_blended(interpolation: str) -> None:
    depth = torch.full((1, 30, 30), 4.0)
    depth[:, 10:20, 10:20] = 0.0  # invalid hole
    sample = {"image": torch.rand(3, 30, 30), "targets": {"d": depth}, "valid": {"d": True}, "id": "x"}
    for zoom in (0.7, 1.0, 1.5):
        t = build_transforms(
            {"scale": [zoom, zoom], "depth_interpolation": interpolation},
            {"d": K.DEPTH},
            train=True,
            generator=torch.Generator().manual_seed(1),
        )
        out = t(sample)["targets"]["d"]
        positive = out[out > 0]
        assert torch.allclose(positive, torch.full_like(positive, 4.0 / zoom))
        assert (out >= 0).all()
        assert (out > 0).float().mean() > 0.2


def test_boxes_leaving_the_crop_are_dropped_with_their_labels() -> None:
    sample = scene(40, 40, (1, 1, 5, 5))
    sample["targets"]["boxes"] = {
        "boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0], [20.0, 20.0, 39.0, 39.0]]),
        "labels": torch.tensor([3, 7]),
    }
    transform = build_transforms(
        {"crop": [20, 20], "scale": [1.0, 1.0], "hflip": 0.0},
        KINDS,
        train=True,
        generator=torch.Generator().manual_seed(0),
    )
    # a crop that sees the large box's top-left quarter only, never the small box
    transform._randint = lambda high: min(high, 18)  # type: ignore[method-assign]
    out = transform(sample)["targets"]["boxes"]
    assert out["labels"].tolist() == [7]
    assert out["boxes"].tolist() == [[2.0, 2.0, 20.0, 20.0]]


def test_partial_visibility_rule() -> None:
    sample = scene(40, 40, (0, 0, 40, 8))
    transform = build_transforms({"crop": [20, 20], "min_box_visibility": 0.5, "hflip": 0.0}, KINDS, train=True)
    transform._randint = lambda high: 0  # type: ignore[method-assign]
    # 20 of 40 columns visible: exactly half of the area, kept at 0.5 ...
    assert transform(sample)["targets"]["boxes"]["boxes"].shape[0] == 1
    strict = build_transforms({"crop": [20, 20], "min_box_visibility": 0.6, "hflip": 0.0}, KINDS, train=True)
    strict._randint = lambda high: 0  # type: ignore[method-assign]
    assert strict(sample)["targets"]["boxes"]["boxes"].shape[0] == 0  # ... and dropped at 0.6


def test_padding_uses_each_kinds_ignore_value() -> None:
    sample = scene(10, 10, (2, 2, 6, 6))
    specs = {**KINDS, "seg": TargetSpec(K.MASK, ignore_index=250)}
    out = build_transforms({"crop": [14, 16], "hflip": 0.0}, specs, train=True)(sample)
    t = out["targets"]
    assert out["image"].shape == (3, 14, 16)
    assert (t["seg"][10:, :] == 250).all() and (t["seg"][:, 10:] == 250).all()
    assert (t["depth"][:, 10:, :] == 0).all() and (t["normals"][:, :, 10:] == 0).all()
    assert (out["image"][:, 10:, :] == 0).all()


def test_resize_keeps_depth_and_scales_boxes() -> None:
    sample = scene(16, 20, (2, 4, 10, 12))
    out = build_transforms({"resize": [32, 40]}, KINDS, train=False)(sample)
    assert out["image"].shape == (3, 32, 40)
    assert out["targets"]["boxes"]["boxes"].tolist() == [[4.0, 8.0, 20.0, 24.0]]
    assert set(out["targets"]["depth"].unique().tolist()) == {2.0, 5.0}
    ys, xs = torch.nonzero(out["targets"]["seg"] == 1, as_tuple=True)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (4, 19, 8, 23)


def test_eval_is_identity_without_resize_and_colour_jitter_touches_image_only() -> None:
    sample = scene(16, 16, (2, 2, 8, 8))
    augment = {"hflip": 1.0, "scale": [0.5, 2.0], "color_jitter": 0.5}
    out = build_transforms(augment, KINDS, train=False)(sample)
    assert torch.equal(out["image"], sample["image"])
    jitter_only = build_transforms({"hflip": 0.0, "color_jitter": 0.5}, KINDS, train=True)(sample)
    assert not torch.equal(jitter_only["image"], sample["image"])
    assert 0.0 <= jitter_only["image"].min() and jitter_only["image"].max() <= 1.0
    for name in ("seg", "depth", "normals"):
        assert torch.equal(jitter_only["targets"][name], sample["targets"][name])


def test_one_draw_per_sample_is_reproducible() -> None:
    augment = {"hflip": 0.5, "scale": [0.7, 1.3], "crop": [12, 12], "color_jitter": 0.4, "hue": 0.1}
    a = build_transforms(augment, KINDS, train=True, generator=torch.Generator().manual_seed(3))
    b = build_transforms(augment, KINDS, train=True, generator=torch.Generator().manual_seed(3))
    sample = scene(16, 16, (2, 2, 8, 8))
    for _ in range(4):
        x, y = a(sample), b(sample)
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["targets"]["seg"], y["targets"]["seg"])


def test_bad_config_is_a_clear_error_and_unknown_targets_are_dropped() -> None:
    with pytest.raises(ConfigError, match="data.augment.scale"):
        build_transforms({"scale": [1.5, 0.5]}, KINDS, train=True)
    with pytest.raises(ConfigError, match="data.augment.flip"):
        build_transforms({"flip": True}, KINDS, train=True)
    out = build_transforms({}, {"seg": K.MASK}, train=True)(
        {
            "image": torch.rand(3, 4, 4),
            "targets": {"seg": torch.zeros(4, 4, dtype=torch.int64), "other": torch.tensor(1)},
            "valid": {"seg": True, "other": True},
            "id": "x",
        }
    )
    assert set(out["targets"]) == set(out["valid"]) == {"seg"}  # unconfigured tasks are dropped
    assert AugmentParams().hflip == 0.5
