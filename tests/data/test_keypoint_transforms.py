"""Joint transforms of keypoint targets: a flip mirrors x -> W - x and swaps the flip pairs, twice is the identity;
a resize scales the coordinates; a crop unlabels keypoints that leave it; the scenes' extreme points follow a
flip of the rendering exactly."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlvision.data.datasets.scenes import extreme_points
from mtlvision.data.transforms import JointTransform, TargetSpec
from mtlvision.tasks.base import TargetKind

PERMUTATION = (0, 3, 2, 1)  # top, right, bottom, left: a flip swaps right and left
SPEC = {"kp": TargetSpec(TargetKind.KEYPOINTS, flip_permutation=PERMUTATION)}


@st.composite
def samples(draw: st.DrawFn) -> dict:
    height, width = draw(st.integers(8, 40)), draw(st.integers(8, 40))
    count = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31))
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, 2, generator=generator) * torch.tensor([width, height])
    low, high = corners.amin(1), corners.amax(1) + 1
    boxes = torch.cat([low, torch.minimum(high, torch.tensor([float(width), float(height)]))], dim=1)
    points = low[:, None] + torch.rand(count, 4, 2, generator=generator) * (boxes[:, None, 2:] - low[:, None])
    visibility = torch.randint(0, 3, (count, 4, 1), generator=generator).float()
    keypoints = torch.cat([points, visibility], dim=2) * (visibility > 0)
    return {
        "image": torch.rand(3, height, width, generator=generator),
        "targets": {"kp": {"keypoints": keypoints, "boxes": boxes}},
        "valid": {"kp": True},
        "id": "s",
    }


def _flip(sample: dict) -> dict:
    return JointTransform(SPEC, hflip=1.0)(sample)


@settings(max_examples=40, deadline=None)
@given(sample=samples())
def test_flip_twice_is_the_identity(sample: dict) -> None:
    twice = _flip(_flip(sample))
    for key in ("keypoints", "boxes"):
        torch.testing.assert_close(twice["targets"]["kp"][key], sample["targets"]["kp"][key])


@settings(max_examples=40, deadline=None)
@given(sample=samples())
def test_flip_mirrors_x_with_the_boxes_convention_and_swaps_the_pairs(sample: dict) -> None:
    width = sample["image"].shape[-1]
    before, after = sample["targets"]["kp"], _flip(sample)["targets"]["kp"]
    for i, j in enumerate(PERMUTATION):
        source = before["keypoints"][:, j]
        labelled = source[:, 2] > 0
        torch.testing.assert_close(after["keypoints"][:, i, 0], torch.where(labelled, width - source[:, 0], 0.0))
        torch.testing.assert_close(after["keypoints"][:, i, 1:], source[:, 1:])
    torch.testing.assert_close(after["boxes"][:, [0, 2]], width - before["boxes"][:, [2, 0]])


@settings(max_examples=40, deadline=None)
@given(sample=samples(), height=st.integers(8, 64), width=st.integers(8, 64))
def test_resize_scales_the_coordinates(sample: dict, height: int, width: int) -> None:
    old_height, old_width = sample["image"].shape[-2:]
    resized = JointTransform(SPEC, resize=(height, width))(sample)["targets"]["kp"]
    scale = torch.tensor([width / old_width, height / old_height, 1.0])
    torch.testing.assert_close(resized["keypoints"], sample["targets"]["kp"]["keypoints"] * scale)
    torch.testing.assert_close(resized["boxes"], sample["targets"]["kp"]["boxes"] * scale[[0, 1, 0, 1]])


def test_a_crop_unlabels_keypoints_outside_it_and_drops_instances_with_their_boxes() -> None:
    keypoints = torch.tensor(
        [[[2.0, 2.0, 2.0], [14.0, 3.0, 1.0], [5.0, 15.0, 2.0], [1.0, 8.0, 2.0]], [[20.0, 20.0, 2.0]] * 4]
    )
    boxes = torch.tensor([[1.0, 1.0, 15.0, 16.0], [19.0, 19.0, 22.0, 22.0]])
    sample = {
        "image": torch.rand(3, 24, 24),
        "targets": {"kp": {"keypoints": keypoints, "boxes": boxes}},
        "valid": {"kp": True},
        "id": "s",
    }
    transform = JointTransform(SPEC, crop=(12, 12), generator=torch.Generator().manual_seed(0))
    # find a draw whose window starts at the origin so that the expectation is easy to write
    for _ in range(200):
        out = transform(sample)["targets"]["kp"]
        if out["boxes"].shape[0] == 1 and out["boxes"][0, 0] == 1.0 and out["boxes"][0, 1] == 1.0:
            break
    else:
        raise AssertionError("no window at the origin in 200 draws")
    expected = torch.tensor([[[2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 8.0, 2.0]]])
    torch.testing.assert_close(out["keypoints"], expected)


def test_the_scenes_extreme_points_follow_a_flip_of_the_rendering() -> None:
    rng = np.random.default_rng(0)
    instance = np.zeros((3, 20, 24), dtype=np.uint8)
    for scene in range(3):
        for k in range(2):
            top, left = rng.integers(0, 12), rng.integers(0, 16)
            blob = rng.random((8, 8)) < 0.6
            region = instance[scene, top : top + 8, left : left + 8]
            region[blob & (region == 0)] = k + 1
    points = extreme_points(instance, 2)
    flipped = extreme_points(instance[:, :, ::-1].copy(), 2)
    for scene in range(3):
        target = {"keypoints": torch.from_numpy(points[scene]), "boxes": torch.zeros(2, 4)}
        sample = {"image": torch.rand(3, 20, 24), "targets": {"kp": target}, "valid": {"kp": True}, "id": "s"}
        mirrored = _flip(sample)["targets"]["kp"]["keypoints"].numpy()
        np.testing.assert_allclose(mirrored, flipped[scene])
        for k in range(2):
            rows, cols = np.nonzero(instance[scene] == k + 1)
            top, right, bottom, left = points[scene, k, :, :2]
            assert top[1] == rows.min() and bottom[1] == rows.max() + 1
            assert left[0] == cols.min() and right[0] == cols.max() + 1
