"""The built-in scenes: every target agrees with the others and with the scene geometry it was drawn from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mtlvision.data.datasets import DATASETS
from mtlvision.data.datasets import scenes as sc

SIZE = 48
SLOTS = 4


@pytest.fixture(scope="module")
def generated() -> tuple[list[sc.SceneLayout], sc.Rendering]:
    layouts, _ = sc.generate(seed=3, split="train", num_scenes=60, image_size=SIZE, max_objects=SLOTS)
    return layouts, sc.render(layouts, SIZE, SLOTS, keep_layers=True)


@pytest.fixture(scope="module")
def dataset() -> sc.SceneDataset:
    params = sc.Scenes.Params(name="scenes", train_size=40, image_size=SIZE, seed=5)
    return sc.Scenes.build(params, "train")


def camera_rays(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size) + 0.5 - size / 2) / (sc.FOCAL * size)
    return np.meshgrid(coords, coords)  # x varies along columns, y along rows


def world_points(layout: sc.SceneLayout, depth: np.ndarray) -> np.ndarray:
    """Back-project a depth map to world coordinates [3, H, W] (camera at the origin, pitched down)."""
    ray_x, ray_y = camera_rays(depth.shape[-1])
    cam = np.stack([ray_x * depth, ray_y * depth, depth])
    cos, sin = np.cos(layout.pitch), np.sin(layout.pitch)
    return np.stack([cam[0], cos * cam[1] + sin * cam[2], -sin * cam[1] + cos * cam[2]])


def test_registered_with_the_task_specs_in_preset_order() -> None:
    source = DATASETS.get("scenes")
    specs = source.tasks(source.Params(name="scenes"))
    assert list(specs) == ["count", "colors", "segmentation", "depth", "normals", "detection", "edges", "keypoints"]
    assert source.default_tasks(source.Params(name="scenes")) == list(specs)[:6]  # edges, keypoints when named
    assert specs["edges"].kind == "edges" and specs["keypoints"].kind == "keypoints"
    assert specs["keypoints"].params["flip_pairs"] == [["right", "left"]]
    assert specs["count"].kind == "classification" and specs["count"].params["num_classes"] == 4
    assert specs["count"].params["class_names"] == ["1", "2", "3", "4"]
    assert specs["colors"].params == {"num_labels": len(sc.COLORS), "label_names": list(sc.COLOR_NAMES)}
    assert specs["segmentation"].params["class_names"] == ["background", *sc.SHAPES]
    assert specs["segmentation"].params["num_classes"] == len(sc.SHAPES) + 1
    assert specs["detection"].params == {"num_classes": len(sc.SHAPES), "class_names": list(sc.SHAPES)}
    assert (specs["depth"].kind, specs["normals"].kind) == ("depth", "normals")


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="image_size"):
        sc.Scenes.Params(name="scenes", image_size=8)
    with pytest.raises(ValidationError, match="colour"):
        sc.Scenes.Params(name="scenes", colour="red")


def test_sample_format(dataset: sc.SceneDataset) -> None:
    sample = dataset[3]
    assert sample["id"] == "train/3"
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, SIZE, SIZE)
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    t = sample["targets"]
    assert t["count"].dtype == torch.int64 and t["count"].ndim == 0
    assert t["colors"].dtype == torch.float32 and t["colors"].shape == (len(sc.COLORS),)
    assert t["segmentation"].dtype == torch.int64 and t["segmentation"].shape == (SIZE, SIZE)
    assert t["depth"].dtype == torch.float32 and t["depth"].shape == (1, SIZE, SIZE)
    assert t["normals"].dtype == torch.float32 and t["normals"].shape == (3, SIZE, SIZE)
    assert t["detection"]["boxes"].dtype == torch.float32 and t["detection"]["labels"].dtype == torch.int64
    assert t["edges"].dtype == torch.int64 and t["edges"].shape == (SIZE, SIZE)
    count = t["detection"]["boxes"].shape[0]
    assert t["keypoints"]["keypoints"].shape == (count, 4, 3) and bool((t["keypoints"]["keypoints"][..., 2] == 2).all())
    assert torch.equal(t["keypoints"]["boxes"], t["detection"]["boxes"])  # the extreme points lie on these boxes
    boxes, points = t["keypoints"]["boxes"], t["keypoints"]["keypoints"]
    assert torch.equal(points[:, 0, 1], boxes[:, 1]) and torch.equal(points[:, 1, 0], boxes[:, 2])
    assert torch.equal(points[:, 2, 1], boxes[:, 3]) and torch.equal(points[:, 3, 0], boxes[:, 0])
    assert sample["valid"] == dict.fromkeys(t, True)


def test_count_colours_and_box_labels_match_the_objects(dataset: sc.SceneDataset) -> None:
    seen_counts = set()
    for i in range(len(dataset)):
        t = dataset[i]["targets"]
        count = int(dataset.counts[i])
        seen_counts.add(count)
        assert int(t["count"]) == count - 1
        assert set(np.unique(dataset.instance[i])) - {0} == set(range(1, count + 1))  # every object visible
        assert set(np.flatnonzero(t["colors"].numpy())) == set(dataset.colors[i, :count].tolist())
        assert t["detection"]["labels"].tolist() == dataset.shapes[i, :count].tolist()
        assert len(t["detection"]["boxes"]) == count
    assert seen_counts == {1, 2, 3, 4}


def test_each_box_encloses_exactly_its_objects_visible_pixels(dataset: sc.SceneDataset) -> None:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    for i in range(len(dataset)):
        t = dataset[i]["targets"]
        for k, (x1, y1, x2, y2) in enumerate(t["detection"]["boxes"].tolist()):
            visible = dataset.instance[i] == k + 1
            inside = (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)
            assert visible[~inside].sum() == 0  # encloses every visible pixel
            # tight: each edge row / column of the box holds a visible pixel
            assert visible[int(y1)].any() and visible[int(y2) - 1].any()
            assert visible[:, int(x1)].any() and visible[:, int(x2) - 1].any()


def test_segmentation_is_the_shape_of_the_visible_object(dataset: sc.SceneDataset) -> None:
    for i in range(len(dataset)):
        seg = dataset[i]["targets"]["segmentation"].numpy()
        instance = dataset.instance[i]
        assert np.all((seg == 0) == (instance == 0))
        for k in range(int(dataset.counts[i])):
            assert np.all(seg[instance == k + 1] == dataset.shapes[i, k] + 1)


def test_edges_are_the_occluding_contours_of_the_objects(generated) -> None:
    _, rendering = generated
    edges = sc.occluding_contours(rendering.instance, rendering.depth)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 1}
    for n in range(8):  # pixel by pixel, against the rule: an object pixel beside background or a farther object
        instance, depth = rendering.instance[n], rendering.depth[n]
        want = np.zeros((SIZE, SIZE), np.uint8)
        for r in range(SIZE):
            for c in range(SIZE):
                if instance[r, c] == 0:
                    continue
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < SIZE and 0 <= cc < SIZE and instance[rr, cc] != instance[r, c]:
                        if instance[rr, cc] == 0 or depth[rr, cc] > depth[r, c]:
                            want[r, c] = 1
        np.testing.assert_array_equal(edges[n], want)
        for k in np.unique(instance[instance > 0]):  # every visible object has a contour
            assert edges[n][instance == k].any()


def test_depth_is_the_nearest_surface_and_nearer_where_objects_occlude(generated) -> None:
    layouts, r = generated
    occluded_pixels = 0
    for i, layout in enumerate(layouts):
        layers, depth, instance = r.layers[i], r.depth[i], r.instance[i]
        assert np.all(depth > 0)
        assert np.allclose(depth, layers.min(0))  # z-buffer: the nearest of background and every object
        background = instance == 0
        assert np.all(np.isinf(layers[1:, background]))  # no object covers a background pixel
        for k in range(len(layout.shape)):
            mine = instance == k + 1
            assert np.all(depth[mine] < layers[0][mine])  # in front of the background
            for j in range(len(layout.shape)):
                behind = mine & np.isfinite(layers[j + 1]) & (j != k)
                occluded_pixels += behind.sum()
                assert np.all(depth[behind] < layers[j + 1][behind])  # in front of what it occludes
            silhouette = np.isfinite(layers[k + 1]).sum()
            assert mine.sum() >= sc.MIN_VISIBLE_FRACTION * silhouette  # at most 70% hidden
    assert occluded_pixels > 100  # the set does contain occlusions


def test_depth_back_projects_onto_the_scene_geometry(generated) -> None:
    """Independent of the renderer: 3D points from the depth map lie on the floor, wall or object surface."""
    layouts, r = generated
    for i, layout in enumerate(layouts):
        points = world_points(layout, r.depth[i].astype(np.float64))
        instance = r.instance[i]
        on_floor = np.isclose(points[1], layout.camera_height, atol=1e-3)
        on_wall = np.isclose(points[2], layout.wall_distance, atol=1e-3)
        assert np.all((on_floor | on_wall)[instance == 0])
        for k in range(len(layout.shape)):
            mine = instance == k + 1
            size, height = layout.size[k], layout.height[k]
            dx, dz = points[0][mine] - layout.x[k], points[2][mine] - layout.z[k]
            up = layout.camera_height - points[1][mine]  # height above the floor
            assert np.all((up > -1e-3) & (up < height + 1e-3))
            shape = sc.SHAPES[layout.shape[k]]
            if shape == "sphere":
                np.testing.assert_allclose(np.sqrt(dx**2 + dz**2 + (up - size) ** 2), size, atol=1e-3)
            elif shape == "cylinder":
                radial = np.sqrt(dx**2 + dz**2)
                assert np.all(
                    np.isclose(radial, size, atol=1e-3) | (np.isclose(up, height, atol=1e-3) & (radial <= size + 1e-3))
                )
            elif shape == "cone":
                np.testing.assert_allclose(np.sqrt(dx**2 + dz**2), size * (1 - up / height), atol=1e-3)
            else:  # cube: in its own frame, on the surface of [-a, a]^3
                c, s = np.cos(layout.yaw[k]), np.sin(layout.yaw[k])
                local = np.stack([c * dx - s * dz, up - size, s * dx + c * dz])
                np.testing.assert_allclose(np.abs(local).max(0), size, atol=1e-3)


def test_normals_are_unit_facing_the_camera_and_match_the_geometry(generated) -> None:
    layouts, r = generated
    ray_x, ray_y = camera_rays(SIZE)
    for i, layout in enumerate(layouts):
        normals, instance = r.normals[i], r.instance[i]
        np.testing.assert_allclose(np.linalg.norm(normals, axis=0), 1.0, atol=1e-5)
        # facing the viewing ray (x, y, 1) whose z, in the target convention, points away from the camera
        assert np.all(normals[0] * ray_x + normals[1] * ray_y - normals[2] < 0)
        # z > 0 except at grazing silhouettes seen off-axis (a physically exact normal may point sideways)
        assert (normals[2] > 0).mean() > 0.99
        cos, sin = np.cos(layout.pitch), np.sin(layout.pitch)
        background = instance == 0
        points = world_points(layout, r.depth[i].astype(np.float64))
        on_floor = np.isclose(points[1], layout.camera_height, atol=1e-4)
        on_wall = np.isclose(points[2], layout.wall_distance, atol=1e-4)
        floor, wall = background & on_floor & ~on_wall, background & on_wall & ~on_floor  # the seam is ambiguous
        assert floor.sum() + wall.sum() >= background.sum() - SIZE
        np.testing.assert_allclose(normals[:, floor].T, np.broadcast_to([0, -cos, sin], (floor.sum(), 3)), atol=1e-5)
        np.testing.assert_allclose(normals[:, wall].T, np.broadcast_to([0, sin, cos], (wall.sum(), 3)), atol=1e-5)
        for k in np.flatnonzero(layout.shape == sc.SHAPES.index("sphere")):
            mine = instance == k + 1
            centre = np.array([layout.x[k], layout.camera_height - layout.size[k], layout.z[k]])
            world = (points[:, mine] - centre[:, None]) / layout.size[k]
            expected = np.stack([world[0], cos * world[1] - sin * world[2], -(sin * world[1] + cos * world[2])])
            np.testing.assert_allclose(normals[:, mine], expected, atol=2e-3)


def test_object_pixels_have_the_hue_of_their_colour_label(generated) -> None:
    layouts, r = generated
    palette = np.array(list(sc.COLORS.values()))
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    for i, layout in enumerate(layouts):
        for k, colour in enumerate(layout.color):
            pixels = r.image[i][:, r.instance[i] == k + 1].astype(np.float64)
            chroma = pixels / np.maximum(np.linalg.norm(pixels, axis=0), 1e-9)
            assert np.argmax(palette @ chroma.mean(1)) == colour


def test_rendering_is_lit_background_is_muted_and_objects_saturated(generated) -> None:
    _, r = generated
    image = r.image.astype(np.float64) / 255
    saturation = image.max(1) - image.min(1)
    assert saturation[r.instance == 0].mean() < 0.15 < saturation[r.instance > 0].mean()


def test_deterministic_from_the_seed_and_independent_of_the_split_size() -> None:
    _, a = sc.generate(7, "val", 12, 32, SLOTS)
    _, b = sc.generate(7, "val", 12, 32, SLOTS)
    _, first = sc.generate(7, "val", 5, 32, SLOTS)
    for name in sc._ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(getattr(a, name)[:5], getattr(first, name))


def test_seeds_and_splits_give_different_scenes() -> None:
    _, base = sc.generate(7, "train", 8, 32, SLOTS)
    _, other_seed = sc.generate(8, "train", 8, 32, SLOTS)
    _, other_split = sc.generate(7, "test", 8, 32, SLOTS)
    for other in (other_seed, other_split):
        assert all(not np.array_equal(base.image[i], other.image[i]) for i in range(8))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    image_size=st.integers(16, 40),
    max_objects=st.integers(1, 4),
    split=st.sampled_from(["train", "val", "test"]),
)
def test_invariants_hold_for_any_seed_and_size(seed: int, image_size: int, max_objects: int, split: str) -> None:
    params = sc.Scenes.Params(name="scenes", image_size=image_size, max_objects=max_objects, seed=seed,
                              train_size=3, val_size=3, test_size=3)  # fmt: skip
    dataset = sc.Scenes.build(params, split)
    assert len(dataset) == 3
    for i in range(3):
        t = dataset[i]["targets"]
        count = int(t["count"]) + 1
        assert 1 <= count <= max_objects
        assert set(np.unique(dataset.instance[i])) - {0} == set(range(1, count + 1))
        assert torch.all(t["depth"] > 0)
        assert torch.allclose(t["normals"].norm(dim=0), torch.ones(image_size, image_size), atol=2e-3)
        boxes = t["detection"]["boxes"]
        assert torch.all((boxes[:, :2] >= 0) & (boxes[:, 2:] <= image_size) & (boxes[:, 2:] > boxes[:, :2]))
        assert int(t["segmentation"].max()) <= len(sc.SHAPES)


def test_a_split_too_large_to_render_is_refused_at_config_time():
    from mtlvision.config import load_config
    from mtlvision.engine.build import dataset_source
    from mtlvision.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.*train_size=10000000000 .* GiB"):
        dataset_source(load_config("scenes", {"data.train_size": 10_000_000_000}))
    dataset_source(load_config("scenes", {"data.train_size": 100_000}))  # 8 GiB at 64 px: allowed
