"""``scenes``: the built-in dataset, procedurally rendered solids with every target kind, no files needed.

Each scene is ray-cast analytically (not rasterised from meshes) so that every target is exact and agrees
with the others: a pinhole camera, pitched down, looks at a checkered floor and a brick back wall; one to
``max_objects`` solids (sphere, cube, cylinder, cone) in six saturated colours rest on the floor at
different distances. A per-pixel z-buffer keeps the nearest surface, so nearer objects occlude farther
ones; Lambertian shading from one directional light plus ambient light makes the image. Placements that
hide more than 70% of an object (or leave it only a few pixels) are redrawn, so every object counts as
visible.

Targets per sample: ``count`` (objects minus one), ``colors`` (multi-hot over the six colours),
``segmentation`` (shape class per pixel, 0 = background), ``depth`` (camera z-depth in world units,
positive everywhere), ``normals`` (unit, camera frame: x right, y down, z towards the camera; every
visible normal faces its viewing ray, and z > 0 everywhere except on grazing silhouettes near the image
border, where an exact normal may point slightly away along the optical axis: about 0.05% of pixels) and
``detection`` (boxes tight around each object's visible pixels, in pixel-edge coordinates: a box holding
only pixel (column c, row r) is ``(c, r, c + 1, r + 1)``; labels are shape classes, 0-based) and ``edges``
(the objects' occluding contours, exact from the renderer's instance map and z-buffer: 1 on an object pixel
with a 4-neighbour that shows the background or a farther object, else 0; one pixel thick, drawn on the
occluding side) and ``keypoints`` (each object's four extreme points, as ExtremeNet annotates objects (Zhou, Zhuo
and Krähenbühl, CVPR 2019): ``top``, ``right``, ``bottom``, ``left`` of its visible pixels, exact from the instance
map: the extreme point lies on the tight box's side, at the median pixel centre of the object's pixels in the
extreme row or column; all visible (v = 2); a horizontal flip swaps ``left`` and ``right``). ``edges`` and
``keypoints`` are offered but not in the default task set (a config or preset names them), so configs that leave
``tasks`` out train the same six tasks as before.

Every scene is drawn from its own random stream ``(seed, split, index)``, so a scene does not depend on
the split's size nor on the rendering order. Splits are rendered once, at build time, into compact arrays
(uint8 images and masks, float16 depth and normals); ``__getitem__`` only converts one slice to tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import Dataset

from mtlvision.data.datasets.base import DATASETS, SPLITS, DatasetParams, DatasetSource, TaskSpec

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.12),
    "green": (0.16, 0.70, 0.20),
    "blue": (0.14, 0.30, 0.92),
    "yellow": (0.93, 0.82, 0.10),
    "magenta": (0.86, 0.18, 0.78),
    "cyan": (0.12, 0.80, 0.84),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

FOCAL = 1.0  # focal length in units of the image width (horizontal field of view about 53 degrees)
AMBIENT, DIFFUSE = 0.35, 0.65  # Lambertian shading: albedo * (AMBIENT + DIFFUSE * max(0, n . l))
LIGHT = np.array([-0.45, -1.0, -0.55]) / np.linalg.norm([-0.45, -1.0, -0.55])  # towards the light (world)
MIN_VISIBLE_FRACTION = 0.3  # an object must keep at least 30% of its silhouette visible ...
MIN_VISIBLE_AREA = 0.002  # ... and at least this fraction of the image (and 4 pixels)
MAX_REDRAWS = 200

# Object sizes in world units: (low, high) of the size (radius or half-edge) and of the height.
SIZE_RANGE = {"sphere": (0.35, 0.6), "cube": (0.3, 0.5), "cylinder": (0.25, 0.45), "cone": (0.35, 0.55)}
HEIGHT_RANGE = {"cylinder": (0.7, 1.3), "cone": (0.8, 1.4)}


@dataclass
class SceneLayout:
    """One scene: camera pose, background look and the objects (world frame: x right, y down, z forward).

    The camera sits at the origin, pitched down by ``pitch`` radians; the floor is the plane
    ``y = camera_height`` and the back wall the plane ``z = wall_distance``. Object ``k`` rests on the floor
    at ``(x[k], z[k])``.
    """

    pitch: float
    camera_height: float
    wall_distance: float
    floor_color: np.ndarray  # [3]
    wall_color: np.ndarray  # [3]
    tile: float
    shape: np.ndarray  # int [n] index into SHAPES
    color: np.ndarray  # int [n] index into COLOR_NAMES
    x: np.ndarray  # [n]
    z: np.ndarray  # [n]
    size: np.ndarray  # [n] radius (sphere, cylinder, cone) or half-edge (cube)
    height: np.ndarray  # [n] cylinder / cone height (2 * size for spheres and cubes)
    yaw: np.ndarray  # [n] rotation of cubes about the vertical axis


def _muted_color(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A low-saturation colour, so that objects stand out from the background by hue."""
    return np.clip(rng.uniform(low, high) + rng.uniform(-0.06, 0.06, size=3), 0.0, 1.0)


def _footprint(shape: str, size: float) -> float:
    return size * np.sqrt(2.0) if shape == "cube" else size


def sample_layout(rng: np.random.Generator, max_objects: int) -> SceneLayout:
    """Draw one scene: camera, background and 1..max_objects non-intersecting objects on the floor."""
    pitch = rng.uniform(0.35, 0.50)
    cam_h = rng.uniform(1.7, 2.2)
    wall = rng.uniform(9.0, 11.0)
    floor_color = _muted_color(rng, 0.45, 0.70)
    wall_color = _muted_color(rng, 0.55, 0.80)
    tile = rng.uniform(0.45, 0.8)
    cos, sin = np.cos(pitch), np.sin(pitch)
    # nearest floor distance whose points project above the bottom image edge (with a margin)
    z_near = cam_h * (cos - 0.42 * sin) / (sin + 0.42 * cos) + 0.6
    z_far = wall - 2.0
    count = int(rng.integers(1, max_objects + 1))
    while True:
        shapes: list[int] = []
        colors: list[int] = []
        xs: list[float] = []
        zs: list[float] = []
        sizes: list[float] = []
        heights: list[float] = []
        yaws: list[float] = []
        for _ in range(count):
            shape = int(rng.integers(len(SHAPES)))
            name = SHAPES[shape]
            size = rng.uniform(*SIZE_RANGE[name])
            height = rng.uniform(*HEIGHT_RANGE[name]) if name in HEIGHT_RANGE else 2.0 * size
            for _attempt in range(30):
                z = rng.uniform(z_near, z_far)
                centre_y = cam_h - height / 2.0
                depth = sin * centre_y + cos * z
                x = rng.uniform(-0.38, 0.38) * depth
                clear = all(
                    np.hypot(x - ox, z - oz) > _footprint(name, size) + _footprint(SHAPES[os_], osz) + 0.05
                    for ox, oz, os_, osz in zip(xs, zs, shapes, sizes, strict=True)
                )
                if clear:
                    break
            else:
                break  # no room left for this object: redraw the whole set
            shapes.append(shape)
            colors.append(int(rng.integers(len(COLORS))))
            xs.append(x)
            zs.append(z)
            sizes.append(size)
            heights.append(height)
            yaws.append(rng.uniform(0.0, np.pi / 2))
        if len(shapes) == count:
            break
    return SceneLayout(
        pitch, cam_h, wall, floor_color, wall_color, tile,
        np.array(shapes), np.array(colors), np.array(xs), np.array(zs),
        np.array(sizes), np.array(heights), np.array(yaws),
    )  # fmt: skip


# ----------------------------------------------------------------------------------- ray-solid intersection
# Every intersector takes ray directions d [m, 3] from the camera at the origin (parametrised so that the
# camera-frame z of d is 1, hence t is the z-depth) and per-ray object parameters [m], and returns the
# nearest positive hit t [m] (inf on a miss) and the outward unit normal [m, 3] in the world frame.
Intersector = Callable[[np.ndarray, dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


def _quadratic_roots(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both roots (smaller, larger) of ``a t^2 - 2 b t + c = 0``; NaN or inf where there is none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = b * b - a * c
        root = np.sqrt(np.where(disc >= 0, disc, np.nan))
        lo, hi = (b - root) / a, (b + root) / a
    return np.minimum(lo, hi), np.maximum(lo, hi)


def _sphere(d: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    centre = np.stack([p["x"], p["floor"] - p["size"], p["z"]], axis=1)
    near, _ = _quadratic_roots((d * d).sum(1), (d * centre).sum(1), (centre * centre).sum(1) - p["size"] ** 2)
    t = np.where(near > 0, near, np.inf)
    normal = (np.nan_to_num(t, posinf=0.0)[:, None] * d - centre) / p["size"][:, None]
    return t, normal


def _yaw(v: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate vectors [m, 3] about the vertical (y) axis."""
    return np.stack([cos * v[:, 0] - sin * v[:, 2], v[:, 1], sin * v[:, 0] + cos * v[:, 2]], axis=1)


def _cube(d: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    # slab method in the cube's own frame (rotated by yaw about the vertical axis)
    cos, sin = np.cos(p["yaw"]), np.sin(p["yaw"])
    half = p["size"]
    o = _yaw(-np.stack([p["x"], p["floor"] - half, p["z"]], axis=1), cos, sin)
    dl = _yaw(d, cos, sin)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half[:, None] - o) / dl
        t2 = (half[:, None] - o) / dl
    enter, leave = np.minimum(t1, t2), np.maximum(t1, t2)
    axis = np.argmax(enter, axis=1)
    t_near, t_far = enter.max(1), leave.min(1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    local = np.zeros_like(d)
    rows = np.arange(len(d))
    local[rows, axis] = -np.sign(dl[rows, axis])
    return t, _yaw(local, cos, -sin)


def _upright(d: np.ndarray, p: dict[str, np.ndarray], slope: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A vertical solid of revolution on the floor: radius ``size - slope * (floor - y)``, y >= floor - height.

    ``slope = 0`` gives a cylinder with a flat top; ``slope = size / height`` a cone with its apex up.
    """
    r, h, floor = p["size"], p["height"], p["floor"]
    top = floor - h
    # side, as a t^2 - 2 b t + c = 0 along the ray: (x - X)^2 + (z - Z)^2 = k^2 (y - apex_y)^2 with k the
    # slope and the apex at the top for a cone; (x - X)^2 + (z - Z)^2 = r^2 for a cylinder (k = 0).
    cone = slope > 0
    apex_y = np.where(cone, floor - h, 0.0)
    radius_sq = np.where(cone, 0.0, r * r)
    k2 = slope * slope
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * d[:, 1] ** 2
    b = d[:, 0] * p["x"] + d[:, 2] * p["z"] - k2 * d[:, 1] * apex_y
    c = p["x"] ** 2 + p["z"] ** 2 - k2 * apex_y**2 - radius_sq
    best = np.full(len(d), np.inf)
    for root in _quadratic_roots(a, b, c):
        y = root * d[:, 1]
        ok = (root > 0) & (y >= top) & (y <= floor) & np.isfinite(root)
        best = np.where(ok & (root < best), root, best)
    side_t = best
    # flat top (cylinders only): y = top, inside the radius
    with np.errstate(divide="ignore", invalid="ignore"):
        cap_t = top / d[:, 1]
    cap_x, cap_z = cap_t * d[:, 0] - p["x"], cap_t * d[:, 2] - p["z"]
    cap_ok = ~cone & (cap_t > 0) & (cap_x**2 + cap_z**2 <= r * r)
    use_cap = cap_ok & (cap_t < side_t)
    t = np.where(use_cap, cap_t, side_t)
    finite = np.nan_to_num(t, posinf=0.0)
    qx, qz = finite * d[:, 0] - p["x"], finite * d[:, 2] - p["z"]
    qy = np.where(cone, finite * d[:, 1] - apex_y, 0.0)
    side_normal = np.stack([qx, -k2 * qy, qz], axis=1)
    cap_normal = np.broadcast_to(np.array([0.0, -1.0, 0.0]), d.shape)
    normal = np.where(use_cap[:, None], cap_normal, side_normal)
    normal = normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    return t, normal


def _cylinder(d: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return _upright(d, p, np.zeros_like(p["size"]))


def _cone(d: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return _upright(d, p, p["size"] / p["height"])


INTERSECTORS: dict[str, Intersector] = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone}


def _bounding_sphere(shape: str, size: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Radius of a sphere centred at mid-height that encloses the solid (a cheap pre-test per ray)."""
    if shape == "cube":
        return size * np.sqrt(3.0)
    return np.sqrt(size**2 + (height / 2.0) ** 2)


# --------------------------------------------------------------------------------------------- rendering
@dataclass
class Rendering:
    """Rendered scenes (N scenes, K object slots, S x S pixels)."""

    image: np.ndarray  # uint8 [N, 3, S, S]
    instance: np.ndarray  # uint8 [N, S, S]: 0 background, k + 1 object slot k
    semantic: np.ndarray  # uint8 [N, S, S]: 0 background, shape index + 1
    depth: np.ndarray  # float32 [N, S, S]
    normals: np.ndarray  # float32 [N, 3, S, S] camera frame, z towards the camera
    silhouette: np.ndarray  # int [N, K] pixels the object would cover alone
    visible: np.ndarray  # int [N, K] pixels where it is the nearest surface
    layers: np.ndarray | None  # float32 [N, K + 1, S, S]: background depth, then each object's alone


def _pad(layouts: list[SceneLayout], field: str, slots: int, fill: float) -> np.ndarray:
    out = np.full((len(layouts), slots), fill, dtype=np.float64)
    for i, layout in enumerate(layouts):
        values = getattr(layout, field)
        out[i, : len(values)] = values
    return out


def render(layouts: list[SceneLayout], image_size: int, slots: int, keep_layers: bool = False) -> Rendering:
    """Ray-cast ``layouts`` at ``image_size`` pixels; ``slots`` is the number of object slots (max objects)."""
    # Per-pixel arrays are channel-first ([3, n, P]): numpy is several times slower on a trailing axis of 3.
    n, size = len(layouts), image_size
    pixels = size * size
    coords = ((np.arange(size) + 0.5 - size / 2.0) / (FOCAL * size)).astype(np.float32)
    cam_x = np.tile(coords, size)  # [P] camera-frame ray x (row-major: x varies fastest)
    cam_y = np.repeat(coords, size)
    pitch = np.array([lay.pitch for lay in layouts])
    cos, sin = np.cos(pitch)[:, None].astype(np.float32), np.sin(pitch)[:, None].astype(np.float32)
    rays = np.empty((3, n, pixels), dtype=np.float32)  # world-frame directions with camera z = 1
    rays[0] = cam_x
    rays[1] = cos * cam_y + sin
    rays[2] = -sin * cam_y + cos
    ray_sq = (rays * rays).sum(0)

    floor_y = np.array([lay.camera_height for lay in layouts], dtype=np.float32)[:, None]
    wall_z = np.array([lay.wall_distance for lay in layouts], dtype=np.float32)[:, None]
    with np.errstate(divide="ignore"):
        t_floor = np.where(rays[1] > 0, floor_y / rays[1], np.inf)
    t_wall = wall_z / rays[2]
    on_floor = t_floor < t_wall
    depth = np.minimum(t_floor, t_wall)
    normal = np.zeros((3, n, pixels), dtype=np.float32)
    normal[1] = -on_floor.astype(np.float32)
    normal[2] = on_floor.astype(np.float32) - 1.0
    albedo = _background_albedo(layouts, rays * depth, on_floor)

    instance = np.zeros((n, pixels), dtype=np.uint8)
    silhouette = np.zeros((n, slots), dtype=np.int64)
    layers = np.full((n, slots + 1, pixels), np.inf, dtype=np.float32) if keep_layers else None
    if layers is not None:
        layers[:, 0] = depth
    shapes = _pad(layouts, "shape", slots, -1).astype(int)
    colors = _pad(layouts, "color", slots, 0).astype(int)
    params = {f: _pad(layouts, f, slots, 1.0) for f in ("x", "z", "size", "height", "yaw")}
    params["floor"] = np.repeat(floor_y.astype(np.float64), slots, axis=1)
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    for k in range(slots):
        for shape_index, shape in enumerate(SHAPES):
            scenes = np.flatnonzero(shapes[:, k] == shape_index)
            if scenes.size == 0:
                continue
            obj = {f: v[scenes, k] for f, v in params.items()}
            centre = np.stack([obj["x"], obj["floor"] - obj["height"] / 2.0, obj["z"]]).astype(np.float32)
            radius = _bounding_sphere(shape, obj["size"], obj["height"])
            d = rays[:, scenes]
            b = d[0] * centre[0][:, None] + d[1] * centre[1][:, None] + d[2] * centre[2][:, None]
            maybe = b * b >= ray_sq[scenes] * ((centre * centre).sum(0) - radius**2)[:, None]
            rows, pix = np.nonzero(maybe)
            t, nrm = INTERSECTORS[shape](d[:, rows, pix].T.astype(np.float64), {f: v[rows] for f, v in obj.items()})
            hit = np.isfinite(t)
            rows, pix, t, nrm = rows[hit], pix[hit], t[hit], nrm[hit]
            scene_rows = scenes[rows]
            silhouette[:, k] += np.bincount(scene_rows, minlength=n)
            if layers is not None:
                layers[scene_rows, k + 1, pix] = t
            front = t < depth[scene_rows, pix]
            scene_rows, pix = scene_rows[front], pix[front]
            depth[scene_rows, pix] = t[front]
            normal[:, scene_rows, pix] = nrm[front].T
            instance[scene_rows, pix] = k + 1
            albedo[:, scene_rows, pix] = palette[colors[scene_rows, k]].T

    visible = np.stack([(instance == k + 1).sum(1) for k in range(slots)], axis=1)
    light = LIGHT.astype(np.float32)
    lambert = np.maximum(normal[0] * light[0] + normal[1] * light[1] + normal[2] * light[2], 0.0)
    shade = albedo * (AMBIENT + DIFFUSE * lambert)
    image = (np.clip(shade, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    # world -> camera frame (inverse pitch rotation), then flip z so that it points towards the camera
    cam_normal = np.stack([normal[0], cos * normal[1] - sin * normal[2], -(sin * normal[1] + cos * normal[2])])
    padded_shapes = np.concatenate([np.full((n, 1), -1), shapes], axis=1)
    semantic = (np.take_along_axis(padded_shapes, instance.astype(np.int64), axis=1) + 1).astype(np.uint8)
    grid = (n, size, size)
    return Rendering(
        image=image.reshape(3, n, size, size).transpose(1, 0, 2, 3).copy(),
        instance=instance.reshape(grid),
        semantic=semantic.reshape(grid),
        depth=depth.reshape(grid),
        normals=cam_normal.reshape(3, n, size, size).transpose(1, 0, 2, 3).copy(),
        silhouette=silhouette,
        visible=visible,
        layers=None if layers is None else layers.reshape(n, slots + 1, size, size),
    )


def _background_albedo(layouts: list[SceneLayout], points: np.ndarray, on_floor: np.ndarray) -> np.ndarray:
    """Checkered floor tiles and a brick wall, in world coordinates so the texture recedes in perspective."""
    tile = np.array([lay.tile for lay in layouts], dtype=np.float32)[:, None]
    x, y, z = points
    checker = (np.floor(x / tile) + np.floor(z / tile)) % 2
    course = y / 0.3  # brick courses 0.3 high, bricks 0.6 long, every other course shifted by half a brick
    along = x / 0.6 + 0.5 * (np.floor(course) % 2)
    mortar = (np.abs(course - np.round(course)) < 0.08) | (np.abs(along - np.round(along)) < 0.04)
    brick_shade = 0.86 + 0.035 * ((np.floor(course) * 7 + np.floor(along) * 13) % 5)
    gain = np.where(on_floor, 1.0 - 0.2 * checker, np.where(mortar, np.float32(0.7), brick_shade))
    floor_color = np.stack([lay.floor_color for lay in layouts]).astype(np.float32).T[:, :, None]
    wall_color = np.stack([lay.wall_color for lay in layouts]).astype(np.float32).T[:, :, None]
    return np.where(on_floor, floor_color, wall_color) * gain


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def _acceptable(rendering: Rendering, layouts: list[SceneLayout], image_size: int) -> np.ndarray:
    """Scenes where every object keeps at least 30% of its silhouette and a minimum area visible."""
    min_area = max(4.0, MIN_VISIBLE_AREA * image_size * image_size)
    present = np.arange(rendering.visible.shape[1])[None, :] < np.array([len(lay.shape) for lay in layouts])[:, None]
    ok = (rendering.visible >= MIN_VISIBLE_FRACTION * rendering.silhouette) & (rendering.visible >= min_area)
    return np.all(ok | ~present, axis=1)


def generate(
    seed: int, split: str, num_scenes: int, image_size: int, max_objects: int, chunk: int = 256
) -> tuple[list[SceneLayout], Rendering]:
    """Draw and render ``num_scenes`` scenes of ``split``, redrawing any scene with a hidden object."""
    rngs = [_scene_rng(seed, split, i) for i in range(num_scenes)]
    layouts = [sample_layout(rng, max_objects) for rng in rngs]
    grid = (num_scenes, image_size, image_size)
    out = Rendering(
        image=np.empty((num_scenes, 3, image_size, image_size), dtype=np.uint8),
        instance=np.empty(grid, dtype=np.uint8),
        semantic=np.empty(grid, dtype=np.uint8),
        depth=np.empty(grid, dtype=np.float32),
        normals=np.empty((num_scenes, 3, image_size, image_size), dtype=np.float32),
        silhouette=np.empty((num_scenes, max_objects), dtype=np.int64),
        visible=np.empty((num_scenes, max_objects), dtype=np.int64),
        layers=None,
    )
    for start in range(0, num_scenes, chunk):
        todo = np.arange(start, min(start + chunk, num_scenes))
        for _ in range(MAX_REDRAWS):
            rendering = render([layouts[i] for i in todo], image_size, max_objects)
            good = _acceptable(rendering, [layouts[i] for i in todo], image_size)
            for name in _ARRAY_FIELDS:
                getattr(out, name)[todo[good]] = getattr(rendering, name)[good]
            todo = todo[~good]
            if todo.size == 0:
                break
            for i in todo:
                layouts[i] = sample_layout(rngs[i], max_objects)
        else:
            raise RuntimeError(f"could not place visible objects in {todo.size} scenes at {image_size} px")
    return layouts, out


_ARRAY_FIELDS = ("image", "instance", "semantic", "depth", "normals", "silhouette", "visible")


def occluding_contours(instance: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """uint8 ``[N, S, S]`` edge maps: 1 on an object pixel whose 4-neighbour shows another surface that is the
    background or lies farther away (the nearer side of every occlusion boundary), else 0."""
    edges = np.zeros(instance.shape, dtype=bool)
    # each pair of 4-neighbours once per axis, then each pixel of the pair judged against the other
    for axis in (1, 2):
        first = [slice(None)] * 3
        second = [slice(None)] * 3
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        a, b = tuple(first), tuple(second)
        differ = instance[a] != instance[b]
        edges[a] |= differ & (instance[a] > 0) & ((instance[b] == 0) | (depth[a] < depth[b]))
        edges[b] |= differ & (instance[b] > 0) & ((instance[a] == 0) | (depth[b] < depth[a]))
    return edges.astype(np.uint8)


def tight_boxes(instance: np.ndarray, slots: int) -> np.ndarray:
    """Boxes [N, slots, 4] (x1, y1, x2, y2, pixel edges) around each slot's pixels; zeros where it has none."""
    n, height, width = instance.shape
    boxes = np.zeros((n, slots, 4), dtype=np.float32)
    for k in range(slots):
        mask = instance == k + 1
        rows, cols = mask.any(2), mask.any(1)
        boxes[:, k, 0] = np.argmax(cols, axis=1)
        boxes[:, k, 1] = np.argmax(rows, axis=1)
        boxes[:, k, 2] = width - np.argmax(cols[:, ::-1], axis=1)
        boxes[:, k, 3] = height - np.argmax(rows[:, ::-1], axis=1)
        boxes[~rows.any(1), k] = 0.0
    return boxes


def _median_centre(line: np.ndarray) -> np.ndarray:
    """Per row of a boolean ``[N, L]`` array, the median of its true positions' pixel centres (index + 0.5)."""
    count = line.sum(axis=1)
    cumulative = np.cumsum(line, axis=1)
    low = np.argmax(cumulative >= (count[:, None] + 1) // 2, axis=1)
    high = np.argmax(cumulative >= count[:, None] // 2 + 1, axis=1)
    return (low + high) / 2 + 0.5


#: the scenes' keypoints, their flip pair and OKS sigma (near COCO's hips and ankles, 0.107 and 0.089)
EXTREME_POINTS: tuple[str, ...] = ("top", "right", "bottom", "left")
EXTREME_FLIP_PAIRS: tuple[tuple[str, str], ...] = (("right", "left"),)
EXTREME_SIGMA = 0.1


def extreme_points(instance: np.ndarray, slots: int) -> np.ndarray:
    """Keypoints ``[N, slots, 4, 3]`` (x, y, v): each slot's top, right, bottom and left extreme point (see the module
    docstring), v = 2; zeros where the slot has no pixel."""
    n, height, width = instance.shape
    points = np.zeros((n, slots, len(EXTREME_POINTS), 3), dtype=np.float32)
    scenes = np.arange(n)
    for k in range(slots):
        mask = instance == k + 1
        rows, cols = mask.any(2), mask.any(1)
        top, left = np.argmax(rows, axis=1), np.argmax(cols, axis=1)
        bottom, right = height - 1 - np.argmax(rows[:, ::-1], axis=1), width - 1 - np.argmax(cols[:, ::-1], axis=1)
        points[:, k, 0, :2] = np.stack([_median_centre(mask[scenes, top, :]), top], axis=1)
        points[:, k, 1, :2] = np.stack([right + 1, _median_centre(mask[scenes, :, right])], axis=1)
        points[:, k, 2, :2] = np.stack([_median_centre(mask[scenes, bottom, :]), bottom + 1], axis=1)
        points[:, k, 3, :2] = np.stack([left, _median_centre(mask[scenes, :, left])], axis=1)
        points[:, k, :, 2] = 2.0
        points[~rows.any(1), k] = 0.0
    return points


# ------------------------------------------------------------------------------------------ dataset split
class SceneDataset(Dataset):
    """One pre-rendered split of the scenes dataset (see the module docstring for the targets)."""

    def __init__(self, split: str, layouts: list[SceneLayout], rendering: Rendering, max_objects: int) -> None:
        self.split = split
        self.images = rendering.image
        self.semantic = rendering.semantic
        self.instance = rendering.instance
        self.depth = rendering.depth.astype(np.float16)
        self.normals = rendering.normals.astype(np.float16)
        self.counts = np.array([len(lay.shape) for lay in layouts], dtype=np.int64)
        self.shapes = _pad(layouts, "shape", max_objects, -1).astype(np.int64)
        self.colors = _pad(layouts, "color", max_objects, -1).astype(np.int64)
        self.boxes = tight_boxes(rendering.instance, max_objects)
        self.edges = occluding_contours(rendering.instance, rendering.depth)
        self.keypoints = extreme_points(rendering.instance, max_objects)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        count = int(self.counts[index])
        colors = torch.zeros(len(COLORS), dtype=torch.float32)
        colors[torch.from_numpy(self.colors[index, :count])] = 1.0
        targets: dict[str, Tensor | dict[str, Tensor]] = {
            "count": torch.tensor(count - 1, dtype=torch.int64),
            "colors": colors,
            "segmentation": torch.from_numpy(self.semantic[index]).long(),
            "depth": torch.from_numpy(self.depth[index]).float().unsqueeze(0),
            "normals": torch.from_numpy(self.normals[index]).float(),
            "detection": {
                "boxes": torch.from_numpy(self.boxes[index, :count].copy()),
                "labels": torch.from_numpy(self.shapes[index, :count].copy()),
            },
            "edges": torch.from_numpy(self.edges[index]).long(),
            "keypoints": {
                "keypoints": torch.from_numpy(self.keypoints[index, :count].copy()),
                "boxes": torch.from_numpy(self.boxes[index, :count].copy()),
            },
        }
        return {
            "image": torch.from_numpy(self.images[index]).float().div_(255.0),
            "targets": targets,
            "valid": {name: True for name in targets},
            "id": f"{self.split}/{index}",
        }


#: bytes a rendered scene holds per pixel: image (3 x uint8), instance, semantic and edge maps (uint8 each),
#: depth (float32) and normals (3 x float32)
RENDERED_BYTES_PER_PIXEL = 3 + 1 + 1 + 1 + 4 + 12
MAX_SPLIT_BYTES = 16 * 2**30


class ScenesParams(DatasetParams):
    """Config keys of the ``scenes`` dataset (``data.*``)."""

    train_size: int = Field(3000, ge=1, description="scenes in the train split")
    val_size: int = Field(500, ge=1, description="scenes in the val split")
    test_size: int = Field(500, ge=1, description="scenes in the test split")
    image_size: int = Field(64, ge=16, le=512, description="height and width in pixels")
    max_objects: int = Field(4, ge=1, le=6, description="scenes hold 1..max_objects objects")
    seed: int = Field(0, ge=0, description="seed of the scene generator")

    @model_validator(mode="after")
    def _split_fits_in_memory(self) -> ScenesParams:
        # a split is rendered into memory at once: refuse at config time what could never be held (a typo such
        # as train_size=10000000000 would otherwise loop in the layout generator for hours)
        for key in ("train_size", "val_size", "test_size"):
            needed = getattr(self, key) * RENDERED_BYTES_PER_PIXEL * self.image_size**2
            if needed > MAX_SPLIT_BYTES:
                raise ValueError(
                    f"{key}={getattr(self, key)} at image_size={self.image_size} needs {needed / 2**30:.0f} GiB to "
                    f"render in memory; at most {MAX_SPLIT_BYTES // 2**30} GiB per split"
                )
        return self


@DATASETS.register(
    "scenes",
    description="Built-in rendered scenes: count, colours, segmentation, depth, normals, boxes, edges, keypoints",
)
class Scenes(DatasetSource):
    """Built-in procedurally rendered scenes with every target kind (no files needed)."""

    Params = ScenesParams

    @classmethod
    def tasks(cls, params: DatasetParams) -> dict[str, TaskSpec]:
        assert isinstance(params, ScenesParams)
        counts = [str(c) for c in range(1, params.max_objects + 1)]
        return {
            "count": TaskSpec("classification", {"num_classes": params.max_objects, "class_names": counts}),
            "colors": TaskSpec("multilabel", {"num_labels": len(COLORS), "label_names": list(COLOR_NAMES)}),
            "segmentation": TaskSpec(
                "segmentation", {"num_classes": len(SHAPES) + 1, "class_names": ["background", *SHAPES]}
            ),
            "depth": TaskSpec("depth", {}),
            "normals": TaskSpec("normals", {}),
            "detection": TaskSpec("detection", {"num_classes": len(SHAPES), "class_names": list(SHAPES)}),
            "edges": TaskSpec("edges", {}),
            "keypoints": TaskSpec(
                "keypoints",
                {
                    "keypoint_names": list(EXTREME_POINTS),
                    "flip_pairs": [list(pair) for pair in EXTREME_FLIP_PAIRS],
                    "sigmas": [EXTREME_SIGMA] * len(EXTREME_POINTS),
                    "skeleton": [["top", "right"], ["right", "bottom"], ["bottom", "left"], ["left", "top"]],
                },
            ),
        }

    @classmethod
    def default_tasks(cls, params: DatasetParams) -> list[str]:
        """The six tasks of the ``scenes`` preset; ``edges`` and ``keypoints`` are trained when named."""
        return [name for name in cls.tasks(params) if name not in ("edges", "keypoints")]

    @classmethod
    def build(cls, params: DatasetParams, split: str) -> SceneDataset:
        assert isinstance(params, ScenesParams)
        sizes = {"train": params.train_size, "val": params.val_size, "test": params.test_size}
        return _rendered_split(params.seed, split, sizes[split], params.image_size, params.max_objects)


@functools.lru_cache(maxsize=len(SPLITS))
def _rendered_split(seed: int, split: str, num_scenes: int, image_size: int, max_objects: int) -> SceneDataset:
    """Render a split once per process: experts and joint models of one run share the read-only arrays."""
    layouts, rendering = generate(seed, split, num_scenes, image_size, max_objects)
    return SceneDataset(split, layouts, rendering, max_objects)
