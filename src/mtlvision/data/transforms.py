"""Joint transforms: one random draw per sample, applied to the image and to every target by its kind.

A sample (see :mod:`mtlvision.data.datasets.base`) holds an image and one target per task. Geometric
augmentations must move every target with the image, each in the way its :class:`TargetKind` requires; the
table :data:`KIND_OPS` says how (no special case is keyed on a task's name):

============  ==========================  ==========================  ===============  ====================
kind          resize by a zoom ``s``      pad (right / bottom)        horizontal flip  colour jitter
============  ==========================  ==========================  ===============  ====================
label(s)      unchanged                   unchanged                   unchanged        unchanged
mask, edges   nearest                     ``ignore_index`` (255)      flipped          unchanged
depth         nearest (or bilinear over   0 (invalid)                 flipped          unchanged
              valid pixels), then ``/ s``
normals       bilinear over valid pixels, 0 (invalid)                 flipped, x       unchanged
              then renormalised                                       negated
boxes         coordinates ``* s``         unchanged                   mirrored         unchanged
keypoints     coordinates ``* s``         unchanged                   mirrored, left   unchanged
                                                                      and right
                                                                      swapped
============  ==========================  ==========================  ===============  ====================

The training pipeline (:class:`JointTransform`), in order:

1. ``resize`` (optional, train and eval): a deterministic resize to a fixed ``[H, W]``. It keeps the field of
   view, so depth is *not* rescaled.
2. random scale-crop (train): draw a zoom ``s`` uniformly from ``scale``, resize by ``s``, pad to the crop size
   with each kind's ignore value when the zoomed image is smaller, and crop a random ``crop`` window (default:
   the size after step 1). Zooming in by ``s`` is read as the camera moving closer, so depth is divided by ``s``
   (the convention of MTAN, Liu et al. CVPR 2019, and Auto-Lambda, Liu et al. TMLR 2022). A box is kept when
   at least ``min_box_visibility`` of its (zoomed) area lies inside the crop *and* its clipped width and height
   are at least ``min_box_size`` pixels; other boxes are dropped with their labels. Keypoint instances follow
   their boxes' rule; a kept instance's keypoints outside the crop become unlabelled (v = 0).
3. horizontal flip with probability ``hflip`` (normals' x-component negated; keypoints x -> W - x, the boxes'
   pixel-edge convention, then each keypoint swapped with its mirror partner, the task's ``flip_pairs``).
4. colour jitter on the image only.

Targets whose ``valid`` flag is False hold their task's placeholder; they go through the same geometry so that
every target keeps the image's size (placeholders consist of ignore values, which every op maps to ignore
values).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as nnf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mtlvision.tasks.base import TargetKind, Task
from mtlvision.validation import config_error_from

Sample = dict[str, Any]
Size = tuple[int, int]


@dataclass(frozen=True)
class TargetSpec:
    """How the transforms treat one task's target: its kind, the value that marks unlabelled pixels and, for
    keypoints, which keypoint each one becomes after a horizontal flip (``flip_permutation[i]``: the keypoint whose
    mirror image is keypoint ``i``; identity when None)."""

    kind: TargetKind
    ignore_index: int = 255
    flip_permutation: tuple[int, ...] | None = None


def target_specs(tasks: Mapping[str, Task] | Any) -> dict[str, TargetSpec]:
    """The :class:`TargetSpec` of each task (``ignore_index`` and ``flip_permutation`` read from the task where it
    has them)."""
    items = tasks.items() if isinstance(tasks, Mapping) else ((t.name, t) for t in tasks)
    specs = {}
    for name, task in items:
        permutation = getattr(task, "flip_permutation", None)
        specs[name] = TargetSpec(
            task.target_kind,
            int(getattr(task, "ignore_index", 255)),
            tuple(permutation) if permutation is not None else None,
        )
    return specs


# ------------------------------------------------------------------------------------ per-kind operations
# Every op takes the target first; ``ctx`` carries what the kinds need (sizes, zoom, ignore value, options).
@dataclass(frozen=True)
class _Context:
    spec: TargetSpec
    depth_interpolation: str = "nearest"
    min_box_visibility: float = 0.25
    min_box_size: float = 2.0


def _unchanged(target: Any, *_: Any) -> Any:
    return target


def _valid_weighted_resize(values: Tensor, valid: Tensor, size: Size) -> tuple[Tensor, Tensor]:
    """Bilinear resize that averages valid pixels only; returns the values and the resized validity weight.

    Written by hand because torchvision has no masked interpolation: invalid pixels (0 depth, zero normals)
    must not be blended into their valid neighbours.
    """
    weight = valid.to(values.dtype)[None]
    summed = nnf.interpolate((values * weight)[None], size=size, mode="bilinear", align_corners=False)[0]
    norm = nnf.interpolate(weight[None], size=size, mode="bilinear", align_corners=False)[0]
    return summed / norm.clamp_min(1e-6), norm


def _nearest(target: Tensor, size: Size) -> Tensor:
    return F.resize(target, list(size), interpolation=InterpolationMode.NEAREST_EXACT)


def _resize_mask(target: Tensor, old: Size, size: Size, zoom: float, ctx: _Context) -> Tensor:
    return _nearest(tv_tensors.Mask(target[None]), size)[0].as_subclass(Tensor)


def _resize_depth(target: Tensor, old: Size, size: Size, zoom: float, ctx: _Context) -> Tensor:
    if ctx.depth_interpolation == "nearest":
        resized = _nearest(target, size)
    else:
        resized, weight = _valid_weighted_resize(target, target[0] > 0, size)
        resized = torch.where(weight >= 0.5, resized, torch.zeros_like(resized))
    return resized / zoom


def _resize_normals(target: Tensor, old: Size, size: Size, zoom: float, ctx: _Context) -> Tensor:
    valid = target.abs().sum(0) > 0
    resized, weight = _valid_weighted_resize(target, valid, size)
    length = resized.norm(dim=0, keepdim=True)
    keep = (weight >= 0.5) & (length > 1e-6)
    return torch.where(keep, resized / length.clamp_min(1e-6), torch.zeros_like(resized))


def _resize_boxes(target: dict[str, Tensor], old: Size, size: Size, zoom: float, ctx: _Context) -> dict[str, Tensor]:
    boxes = target["boxes"]
    scale = torch.tensor([size[1] / old[1], size[0] / old[0]] * 2, dtype=boxes.dtype)
    return {**target, "boxes": boxes * scale}


def _resize_keypoints(
    target: dict[str, Tensor], old: Size, size: Size, zoom: float, ctx: _Context
) -> dict[str, Tensor]:
    keypoints = target["keypoints"]
    points = tv_tensors.KeyPoints(keypoints[..., :2].reshape(-1, 2), canvas_size=old)
    scaled = F.resize(points, list(size)).as_subclass(Tensor).reshape(keypoints.shape[:-1] + (2,))
    resized = _resize_boxes(target, old, size, zoom, ctx)
    return {**resized, "keypoints": torch.cat([scaled, keypoints[..., 2:]], dim=-1)}


def _unlabel_outside(keypoints: Tensor, height: int, width: int) -> Tensor:
    """Keypoints outside ``[0, W] x [0, H]`` become unlabelled; unlabelled keypoints hold (0, 0, 0), as COCO."""
    x, y = keypoints[..., 0], keypoints[..., 1]
    labelled = (keypoints[..., 2] > 0) & (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
    return keypoints * labelled[..., None].to(keypoints.dtype)


def _pad_with(fill_of: Callable[[TargetSpec], float]) -> Callable[[Tensor, int, int, _Context], Tensor]:
    def pad(target: Tensor, right: int, bottom: int, ctx: _Context) -> Tensor:
        return nnf.pad(target, (0, right, 0, bottom), value=fill_of(ctx.spec))

    return pad


def _crop_dense(target: Tensor, top: int, left: int, height: int, width: int, ctx: _Context) -> Tensor:
    return target[..., top : top + height, left : left + width]


def _crop_boxes(
    target: dict[str, Tensor], top: int, left: int, height: int, width: int, ctx: _Context
) -> dict[str, Tensor]:
    # Own code rather than v2.functional.crop: the visibility rule needs each box's area before clipping.
    boxes = target["boxes"]
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    clipped = torch.minimum(shifted.clamp_min(0), limits)
    area = (shifted[:, 2] - shifted[:, 0]).clamp_min(0) * (shifted[:, 3] - shifted[:, 1]).clamp_min(0)
    sides = clipped[:, 2:] - clipped[:, :2]
    visible = sides[:, 0] * sides[:, 1]
    keep = (visible > 0) & (visible >= ctx.min_box_visibility * area) & (sides >= ctx.min_box_size).all(1)
    count = boxes.shape[0]
    out = {k: v[keep] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == count else v for k, v in target.items()}
    out["boxes"] = clipped[keep]
    return out


def _crop_keypoints(
    target: dict[str, Tensor], top: int, left: int, height: int, width: int, ctx: _Context
) -> dict[str, Tensor]:
    keypoints = target["keypoints"]
    shift = torch.tensor([left, top, 0], dtype=keypoints.dtype)
    cropped = _crop_boxes({**target, "keypoints": keypoints - shift}, top, left, height, width, ctx)
    return {**cropped, "keypoints": _unlabel_outside(cropped["keypoints"], height, width)}


def _flip_dense(target: Tensor, width: int, *_: Any) -> Tensor:
    return F.horizontal_flip(target)


def _flip_normals(target: Tensor, width: int, *_: Any) -> Tensor:
    flipped = F.horizontal_flip(target).clone()
    flipped[0] = -flipped[0]
    return flipped


def _flip_boxes(target: dict[str, Tensor], width: int, *_: Any) -> dict[str, Tensor]:
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(1, width))
    return {**target, "boxes": F.horizontal_flip(boxes).as_subclass(Tensor)}


def _flip_keypoints(target: dict[str, Tensor], width: int, ctx: _Context) -> dict[str, Tensor]:
    # Own code rather than v2.functional.horizontal_flip: torchvision mirrors keypoints as pixel indices
    # (x -> W - 1 - x), while boxes and keypoints here use pixel edges (x -> W - x).
    keypoints = target["keypoints"].clone()
    keypoints[..., 0] = width - keypoints[..., 0]
    if ctx.spec.flip_permutation is not None:
        keypoints = keypoints[:, list(ctx.spec.flip_permutation)]
    return {**_flip_boxes(target, width), "keypoints": keypoints * (keypoints[..., 2:] > 0).to(keypoints.dtype)}


@dataclass(frozen=True)
class KindOps:
    """How one target kind follows the image: ``resize(t, old, new, zoom, ctx)``, ``pad(t, right, bottom,
    ctx)``, ``crop(t, top, left, h, w, ctx)`` and ``flip(t, width, ctx)``."""

    resize: Callable[..., Any]
    pad: Callable[..., Any]
    crop: Callable[..., Any]
    flip: Callable[..., Any]


_IMAGE_LEVEL = KindOps(_unchanged, _unchanged, _unchanged, _unchanged)

KIND_OPS: dict[TargetKind, KindOps] = {
    TargetKind.LABEL: _IMAGE_LEVEL,
    TargetKind.LABELS: _IMAGE_LEVEL,
    TargetKind.MASK: KindOps(_resize_mask, _pad_with(lambda s: float(s.ignore_index)), _crop_dense, _flip_dense),
    TargetKind.EDGES: KindOps(_resize_mask, _pad_with(lambda s: float(s.ignore_index)), _crop_dense, _flip_dense),
    TargetKind.DEPTH: KindOps(_resize_depth, _pad_with(lambda s: 0.0), _crop_dense, _flip_dense),
    TargetKind.NORMALS: KindOps(_resize_normals, _pad_with(lambda s: 0.0), _crop_dense, _flip_normals),
    TargetKind.BOXES: KindOps(_resize_boxes, _unchanged, _crop_boxes, _flip_boxes),
    TargetKind.KEYPOINTS: KindOps(_resize_keypoints, _unchanged, _crop_keypoints, _flip_keypoints),
}
"""Per target kind, how it is resized, padded, cropped and flipped (see the module docstring's table)."""


# --------------------------------------------------------------------------------------------- parameters
class AugmentParams(BaseModel):
    """``data.augment.*``: the joint augmentations (training only, except ``resize``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    resize: tuple[int, int] | None = Field(None, description="fixed [H, W] applied first, train and eval")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    scale: tuple[float, float] = Field((1.0, 1.0), description="zoom range [min, max]; (1, 1) disables")
    crop: tuple[int, int] | None = Field(None, description="crop [H, W] after zooming; default: input size")
    color_jitter: float = Field(0.0, ge=0.0, description="brightness, contrast and saturation strength")
    hue: float = Field(0.0, ge=0.0, le=0.5)
    depth_interpolation: Literal["nearest", "bilinear"] = "nearest"
    min_box_visibility: float = Field(0.25, ge=0.0, le=1.0)
    min_box_size: float = Field(2.0, ge=0.0)

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"must be [min, max] with 0 < min <= max, got {list(scale)}")
        return scale

    @field_validator("resize", "crop")
    @classmethod
    def _check_size(cls, size: tuple[int, int] | None) -> tuple[int, int] | None:
        if size is not None and min(size) <= 0:
            raise ValueError(f"must be two positive integers [H, W], got {list(size)}")
        return size


# ---------------------------------------------------------------------------------------------- transform
@dataclass
class JointTransform:
    """``transform(sample) -> sample``: the pipeline of the module docstring with one random draw per sample.

    ``targets`` maps each task name to its :class:`TargetSpec` (or just its :class:`TargetKind`): the tasks
    being trained. Targets of other tasks (a dataset provides more tasks than a config selects) are dropped
    from the sample with their ``valid`` flags, since they could not be kept aligned. ``generator`` makes the
    draws reproducible (tests); by default torch's global RNG is used, which the DataLoader seeds per worker.
    """

    targets: Mapping[str, TargetSpec | TargetKind]
    resize: Size | None = None
    hflip: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    crop: Size | None = None
    color_jitter: float = 0.0
    hue: float = 0.0
    depth_interpolation: Literal["nearest", "bilinear"] = "nearest"
    min_box_visibility: float = 0.25
    min_box_size: float = 2.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self._contexts = {
            name: _Context(
                spec if isinstance(spec, TargetSpec) else TargetSpec(TargetKind(spec)),
                self.depth_interpolation,
                self.min_box_visibility,
                self.min_box_size,
            )
            for name, spec in self.targets.items()
        }
        strength = self.color_jitter
        ranges = (
            [
                (F.adjust_brightness, (max(0.0, 1 - strength), 1 + strength)),
                (F.adjust_contrast, (max(0.0, 1 - strength), 1 + strength)),
                (F.adjust_saturation, (max(0.0, 1 - strength), 1 + strength)),
            ]
            if strength > 0
            else []
        )
        if self.hue > 0:
            ranges.append((F.adjust_hue, (-self.hue, self.hue)))
        self._jitter_ranges = ranges

    def _ops(self, name: str) -> KindOps:
        return KIND_OPS[self._contexts[name].spec.kind]

    # ---------------------------------------------------------------------------------------- random draws
    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def _randint(self, high_inclusive: int) -> int:
        return int(torch.randint(high_inclusive + 1, (), generator=self.generator))

    # --------------------------------------------------------------------------------------------- pipeline
    def __call__(self, sample: Sample) -> Sample:
        image: Tensor = sample["image"]
        # targets of tasks not configured are dropped: they could not be kept aligned, and nothing uses them
        targets = {n: t for n, t in sample["targets"].items() if n in self._contexts}
        valid = {n: v for n, v in sample.get("valid", {}).items() if n in self._contexts}
        if self.resize is not None and tuple(image.shape[-2:]) != tuple(self.resize):
            height, width = self.resize
            image, targets = self._resize(image, targets, (height, width), zoom=1.0)
        if tuple(self.scale) != (1.0, 1.0) or self.crop is not None:
            image, targets = self._scale_crop(image, targets)
        if self.hflip > 0 and torch.rand((), generator=self.generator).item() < self.hflip:
            width = int(image.shape[-1])
            image = F.horizontal_flip(image)
            targets = {n: self._ops(n).flip(t, width, self._contexts[n]) for n, t in targets.items()}
        if self._jitter_ranges:
            image = self._color_jitter(image)
        return {**sample, "image": image, "targets": targets, "valid": valid}

    def _color_jitter(self, image: Tensor) -> Tensor:
        # v2.ColorJitter's semantics (factors drawn uniformly, ops in random order), drawn here from
        # ``generator`` because v2.ColorJitter draws from the global RNG and would not be reproducible.
        order = torch.randperm(len(self._jitter_ranges), generator=self.generator).tolist()
        for index in order:
            adjust, (low, high) = self._jitter_ranges[index]
            image = adjust(image, self._uniform(low, high))
        return image.clamp(0.0, 1.0)

    def _resize(self, image: Tensor, targets: dict[str, Any], size: Size, zoom: float) -> tuple[Tensor, dict[str, Any]]:
        old = (int(image.shape[-2]), int(image.shape[-1]))
        image = F.resize(image, list(size), antialias=True).clamp(0.0, 1.0)
        return image, {n: self._ops(n).resize(t, old, size, zoom, self._contexts[n]) for n, t in targets.items()}

    def _scale_crop(self, image: Tensor, targets: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        height, width = int(image.shape[-2]), int(image.shape[-1])
        crop_h, crop_w = self.crop or (height, width)
        zoom = self._uniform(*self.scale)
        size = (max(1, round(height * zoom)), max(1, round(width * zoom)))
        # resized even when rounding keeps the size, so that depth is always divided by the drawn zoom
        image, targets = self._resize(image, targets, size, zoom)
        right, bottom = max(crop_w - size[1], 0), max(crop_h - size[0], 0)
        if right or bottom:
            image = nnf.pad(image, (0, right, 0, bottom), value=0.0)
            targets = {n: self._ops(n).pad(t, right, bottom, self._contexts[n]) for n, t in targets.items()}
        top = self._randint(int(image.shape[-2]) - crop_h)
        left = self._randint(int(image.shape[-1]) - crop_w)
        image = image[..., top : top + crop_h, left : left + crop_w]
        targets = {n: self._ops(n).crop(t, top, left, crop_h, crop_w, self._contexts[n]) for n, t in targets.items()}
        return image, targets


def build_transforms(
    augment: Mapping[str, Any] | AugmentParams | None,
    targets: Mapping[str, TargetSpec | TargetKind],
    train: bool,
    generator: torch.Generator | None = None,
) -> JointTransform:
    """The joint transform for ``data.augment`` (a dict or :class:`AugmentParams`).

    At evaluation (``train=False``) or with ``enabled: false`` only the deterministic ``resize`` is applied.
    """
    try:
        params = augment if isinstance(augment, AugmentParams) else AugmentParams(**(augment or {}))
    except ValidationError as err:
        raise config_error_from(
            err, "data.augment", "Invalid augmentation settings", allowed=AugmentParams.model_fields
        ) from None
    common: dict[str, Any] = dict(
        targets=targets, resize=params.resize, depth_interpolation=params.depth_interpolation, generator=generator
    )
    if not (train and params.enabled):
        return JointTransform(**common)
    return JointTransform(
        **common,
        hflip=params.hflip,
        scale=params.scale,
        crop=params.crop,
        color_jitter=params.color_jitter,
        hue=params.hue,
        min_box_visibility=params.min_box_visibility,
        min_box_size=params.min_box_size,
    )
