"""Object detection with an anchor-free FCOS head (Tian et al., ICCV 2019).

Targets are variable-length per image (``{"boxes": [N, 4] xyxy pixels, "labels": [N]}``) and are collated
as a list; the loss pads them per batch behind a mask, so no padded box is ever a target. Training follows FCOS: a
location is positive for a box when it lies inside the box, within ``center_radius`` strides of its centre ("centre
sampling") and the box's largest location-to-side distance falls in the location's level range; a location claimed
by several boxes takes the smallest. Losses (torchvision's focal loss, GIoU loss and a centerness BCE) are summed
over the valid images and divided by the number of positive locations (at least one), as FCOS does.

Small-image adaptation (documented rule): a box that no location claims under the FCOS rule (a box smaller
than its level's stride can fall between location centres) gets the location of its level nearest to its
centre, unless a smaller box already holds it, so that every object is learnt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torchvision.ops import (
    batched_nms,
    clip_boxes_to_image,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)

from mtlvision.errors import ConfigError
from mtlvision.tasks.base import TargetKind, Task, pad_instances, require
from mtlvision.tasks.detection_head import FCOSHead
from mtlvision.tasks.detection_metric import DetectionMetric, Detections
from mtlvision.tasks.drawing import palette, to_rgb_uint8
from mtlvision.tasks.params import name_list, require_count
from mtlvision.tasks.registry import TASKS

BoxTarget = dict[str, Tensor]


def default_strides(feature_strides: Sequence[int]) -> tuple[int, ...]:
    """The backbone levels with strides 4 to 32: FCOS's P3-P5 plus the stride-4 level that small images
    (64 px scenes, objects of 3-35 px) need; every level when none lies in that range."""
    chosen = tuple(s for s in feature_strides if 4 <= s <= 32)
    return chosen or tuple(feature_strides)


def level_ranges(strides: Tensor, size_factor: float) -> tuple[Tensor, Tensor]:
    """Per-location ``(low, high]`` range of the largest box distance, FCOS-style.

    Level ``k`` (strides sorted ascending) takes ``(size_factor * s_{k-1}, size_factor * s_k]``, the finest
    level starting at 0 and the coarsest reaching infinity; FCOS's P3..P7 ranges are ``size_factor = 8``.
    """
    levels = torch.unique(strides)
    upper = levels * size_factor
    upper[-1] = float("inf")
    lower = torch.cat([upper.new_zeros(1), upper[:-1]])
    index = torch.searchsorted(levels, strides)
    return lower[index], upper[index]


def assign_batch(
    points: Tensor,
    strides: Tensor,
    boxes: Tensor,
    box_valid: Tensor,
    center_radius: float = 1.5,
    size_factor: float = 8.0,
) -> Tensor:
    """Index of the box each location regresses (``-1`` for background), shape ``[B, P]``.

    ``points`` ``[P, 2]`` are location centres (x, y), ``strides`` ``[P]`` their level strides, ``boxes``
    ``[B, N, 4]`` xyxy ground truth padded to the batch's largest count and ``box_valid`` ``[B, N]`` marks
    the real ones. Implements FCOS centre sampling with level ranges plus the small-box fall-back described
    in the module docstring, for the whole batch at once (no host synchronisation).
    """
    if boxes.shape[1] == 0:
        return torch.full((boxes.shape[0], points.shape[0]), -1, dtype=torch.long, device=points.device)
    inf = torch.tensor(float("inf"), device=points.device)
    x, y = points[None, :, None, 0], points[None, :, None, 1]  # [1, P, 1]
    distances = torch.stack(
        [x - boxes[:, None, :, 0], y - boxes[:, None, :, 1], boxes[:, None, :, 2] - x, boxes[:, None, :, 3] - y],
        dim=3,
    )  # [B, P, N, 4]
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, N, 2]
    gap = (points[None, :, None, :] - centres[:, None]).abs().amax(dim=3)  # [B, P, N]
    near_centre = gap < center_radius * strides[None, :, None]
    lower, upper = level_ranges(strides, size_factor)
    largest = distances.amax(dim=3)
    in_range = (largest > lower[None, :, None]) & (largest <= upper[None, :, None])
    candidate = (distances.amin(dim=3) > 0) & near_centre & in_range & box_valid[:, None, :]

    areas = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[:, None, :]  # [B, 1, N]
    cost = torch.where(candidate, areas, inf)

    # Fall-back: a real box without candidates claims the location of its level nearest to its centre.
    half_extent = ((boxes[..., 2:] - boxes[..., :2]).amax(dim=2) / 2)[:, None, :]  # [B, 1, N]
    on_level = (half_extent > lower[None, :, None]) & (half_extent <= upper[None, :, None])
    nearest = torch.where(on_level, gap, inf).argmin(dim=1, keepdim=True)  # [B, 1, N]
    orphan = (box_valid & ~candidate.any(dim=1))[:, None, :]
    claims = orphan & (torch.arange(points.shape[0], device=points.device)[None, :, None] == nearest)
    cost = torch.minimum(cost, torch.where(claims, areas, inf))

    best_cost, assigned = cost.min(dim=2)
    return torch.where(torch.isfinite(best_cost), assigned, torch.full_like(assigned, -1))


def assign_targets(
    points: Tensor,
    strides: Tensor,
    boxes: Tensor,
    center_radius: float = 1.5,
    size_factor: float = 8.0,
) -> Tensor:
    """:func:`assign_batch` for one image: ``boxes`` ``[N, 4]`` -> box index per location ``[P]``."""
    box_valid = torch.ones(1, boxes.shape[0], dtype=torch.bool, device=boxes.device)
    return assign_batch(points, strides, boxes[None], box_valid, center_radius, size_factor)[0]


def centerness_target(distances: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` in [0, 1]."""
    left_right = distances[:, [0, 2]].clamp_min(0)
    top_bottom = distances[:, [1, 3]].clamp_min(0)
    ratio = (left_right.amin(1) / left_right.amax(1).clamp_min(1e-6)) * (
        top_bottom.amin(1) / top_bottom.amax(1).clamp_min(1e-6)
    )
    return ratio.sqrt()


@TASKS.register("detection", citation="Tian et al., FCOS: Fully Convolutional One-Stage Object Detection, ICCV 2019")
class Detection(Task):
    """Object detection (boxes with classes) by an anchor-free FCOS head on the multi-scale features.

    ``strides`` picks the pyramid levels the head works on (default: see :func:`default_strides`);
    ``center_radius`` (in strides) and ``size_factor`` (level ranges) are FCOS's assignment settings.

    ``score_threshold``, ``nms_iou``, ``max_detections`` and ``multi_label_decode`` shape the predictions that
    ``decode`` returns and ``draw`` shows: by default each location offers only its best class (one box per
    object rather than the same box under several uncertain classes). The metrics score every class of a
    location, with ``metric_score_threshold`` (lower, as in FCOS's evaluation, so the precision-recall curve
    is not cut short), the same NMS and ``max_detections``.
    """

    kind: ClassVar[str] = "detection"
    target_kind: ClassVar[TargetKind] = TargetKind.BOXES
    level: ClassVar[Literal["image", "dense"]] = "dense"
    default_head: ClassVar[str] = "fcos"
    metric_directions: ClassVar[dict[str, bool]] = {"map_50": True, "map": True, "recall": True}
    primary_metric: ClassVar[str] = "map_50"

    def __init__(
        self,
        name: str,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        score_threshold: float = 0.3,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        pre_nms_top_k: int = 1000,
        metric_score_threshold: float = 0.05,
        strides: Sequence[int] | None = None,
        center_radius: float = 1.5,
        size_factor: float = 8.0,
        head_width: int = 64,
        tower_depth: int = 2,
        multi_label_decode: bool = False,
    ) -> None:
        super().__init__(name)
        require_count(name, "num_classes", num_classes, 1)
        for field, value in {
            "score_threshold": score_threshold,
            "metric_score_threshold": metric_score_threshold,
            "nms_iou": nms_iou,
        }.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"task {name!r}: {field} must lie in [0, 1], got {value}")
        if max_detections < 1 or pre_nms_top_k < 1:
            raise ConfigError(f"task {name!r}: max_detections and pre_nms_top_k must be positive")
        self.num_classes = num_classes
        self.class_names = name_list(name, "class_names", num_classes, class_names)
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.pre_nms_top_k = pre_nms_top_k
        self.metric_score_threshold = metric_score_threshold
        self.strides = tuple(strides) if strides is not None else None
        self.center_radius = center_radius
        self.size_factor = size_factor
        self.head_width = head_width
        self.tower_depth = tower_depth
        self.multi_label_decode = multi_label_decode

    # ----------------------------------------------------------------------------------------- model side
    @property
    def output_channels(self) -> int:
        """Per location: class logits, four box distances and one centerness logit."""
        return self.num_classes + 5

    def build_custom_head(self, feature_channels: Sequence[int], feature_strides: Sequence[int]) -> nn.Module:
        return FCOSHead(
            feature_channels,
            feature_strides,
            self.num_classes,
            strides=self.strides if self.strides is not None else default_strides(feature_strides),
            width=self.head_width,
            tower_depth=self.tower_depth,
        )

    def postprocess(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The raw per-location outputs are the prediction: the loss needs them, :meth:`detect` decodes them."""
        return raw

    # ------------------------------------------------------------------------------------------ training
    def loss(self, prediction: dict[str, Any], target: Sequence[BoxTarget], valid: Tensor) -> Tensor:
        """FCOS loss over valid images: focal + GIoU + centerness BCE, each summed and divided by positives.

        Computed for the whole batch with masks instead of per-image loops or boolean indexing, so that a
        GPU step never waits for the host.
        """
        cls_logits: Tensor = prediction["cls_logits"]
        device = cls_logits.device
        points, strides = prediction["points"], prediction["strides"]
        padded, box_valid = pad_instances(target, {"boxes": ((4,), torch.float32), "labels": ((), torch.long)}, device)
        boxes, labels = padded["boxes"], padded["labels"]
        assigned = assign_batch(points, strides, boxes, box_valid, self.center_radius, self.size_factor)
        positive = (assigned >= 0) & valid.to(device=device, dtype=torch.bool)[:, None]  # [B, P]
        image_weight = valid.to(device=device, dtype=cls_logits.dtype)[:, None]
        num_positive = positive.sum().clamp_min(1).to(cls_logits.dtype)

        index = assigned.clamp_min(0)
        matched_labels = torch.gather(labels, 1, index)
        cls_target = F.one_hot(matched_labels, self.num_classes).to(cls_logits.dtype) * positive[..., None]
        focal = sigmoid_focal_loss(cls_logits, cls_target, reduction="none").sum(dim=2)
        cls_loss = (focal * image_weight).sum()

        matched = torch.gather(boxes, 1, index[..., None].expand(-1, -1, 4))  # [B, P, 4]
        placeholder = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
        matched = torch.where(positive[..., None], matched, placeholder)
        distances = prediction["box_distances"]
        predicted = torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)
        giou = generalized_box_iou_loss(predicted.reshape(-1, 4), matched.reshape(-1, 4), reduction="none")
        box_loss = (giou.reshape(positive.shape) * positive).sum()

        target_distances = torch.cat([points - matched[..., :2], matched[..., 2:] - points], dim=-1)
        ctr_target = centerness_target(target_distances.reshape(-1, 4)).reshape(positive.shape)
        ctr = F.binary_cross_entropy_with_logits(prediction["centerness"], ctr_target, reduction="none")
        centerness_loss = (ctr * positive).sum()
        return (cls_loss + box_loss + centerness_loss) / num_positive

    def metric(self) -> DetectionMetric:
        return DetectionMetric(
            lambda p: self.detect(p, self.metric_score_threshold, multi_label=True), self.class_names
        )

    # ------------------------------------------------------------------------------------------- data side
    def placeholder_target(self, height: int, width: int) -> BoxTarget:
        return {"boxes": torch.zeros((0, 4), dtype=torch.float32), "labels": torch.zeros((0,), dtype=torch.int64)}

    def check_target(self, target: Any, where: str, image_size: tuple[int, int] | None = None) -> None:
        """Boxes finite, ``x2 > x1``, ``y2 > y1``, inside ``[0, W] x [0, H]`` when ``image_size`` is given
        (non-negative otherwise), labels in ``[0, num_classes)``."""
        require(
            isinstance(target, dict) and {"boxes", "labels"} <= set(target),
            where,
            f"task {self.name!r} needs a dict with 'boxes' and 'labels', got {type(target).__name__}",
        )
        boxes, labels = target["boxes"], target["labels"]
        require(
            isinstance(boxes, Tensor) and boxes.ndim == 2 and boxes.shape[1] == 4,
            where,
            f"task {self.name!r}: boxes must be a float tensor [N, 4] (x1, y1, x2, y2)",
        )
        require(
            isinstance(labels, Tensor) and labels.ndim == 1 and labels.shape[0] == boxes.shape[0],
            where,
            f"task {self.name!r}: labels must be an int tensor [N] matching {boxes.shape[0]} boxes",
        )
        require(bool(torch.isfinite(boxes).all()), where, f"task {self.name!r}: a box coordinate is not finite")
        for row, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            require(
                x2 > x1 and y2 > y1,
                where,
                f"task {self.name!r}: box {row} {[x1, y1, x2, y2]} is empty (needs x2 > x1 and y2 > y1)",
            )
            require(
                min(x1, y1) >= 0,
                where,
                f"task {self.name!r}: box {row} {[x1, y1, x2, y2]} starts outside the image (negative coordinate)",
            )
            if image_size is not None:
                height, width = image_size
                require(
                    x2 <= width and y2 <= height,
                    where,
                    f"task {self.name!r}: box {row} {[x1, y1, x2, y2]} ends outside the {width}x{height} image",
                )
        for row, label in enumerate(labels.tolist()):
            require(
                0 <= label < self.num_classes,
                where,
                f"task {self.name!r}: box {row} has label {label}, outside [0, {self.num_classes - 1}]",
            )

    def collate(self, targets: Sequence[BoxTarget]) -> list[BoxTarget]:
        """A list of per-image dicts: images hold different numbers of boxes, so nothing is padded."""
        return list(targets)

    # ----------------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def detect(
        self, prediction: dict[str, Any], score_threshold: float | None = None, multi_label: bool | None = None
    ) -> Detections:
        """Boxes per image: score ``sqrt(sigmoid(cls) * sigmoid(centerness))`` above the threshold, the
        ``pre_nms_top_k`` best, class-wise NMS at ``nms_iou``, at most ``max_detections``.

        ``multi_label`` (default: the task's ``multi_label_decode``): every (location, class) pair above the
        threshold is a candidate, as FCOS evaluates; otherwise each location offers only its best class, so one
        object does not come back as the same box under several classes.
        """
        threshold = self.score_threshold if score_threshold is None else score_threshold
        multi_label = self.multi_label_decode if multi_label is None else multi_label
        points: Tensor = prediction["points"]
        image_size = prediction["image_size"]
        scores_all = (prediction["cls_logits"].sigmoid() * prediction["centerness"].sigmoid()[..., None]).sqrt()
        results: Detections = []
        for scores, distances in zip(scores_all, prediction["box_distances"], strict=True):
            if multi_label:
                flat = scores.flatten()
            else:
                flat, best_class = scores.max(dim=1)
            candidates = torch.nonzero(flat > threshold).flatten()
            if candidates.numel() > self.pre_nms_top_k:
                candidates = candidates[flat[candidates].topk(self.pre_nms_top_k).indices]
            if multi_label:
                location, labels = candidates // self.num_classes, candidates % self.num_classes
            else:
                location, labels = candidates, best_class[candidates]
            boxes = torch.cat(
                [points[location] - distances[location, :2], points[location] + distances[location, 2:]], dim=1
            )
            boxes = clip_boxes_to_image(boxes.float(), image_size)
            kept = batched_nms(boxes, flat[candidates].float(), labels, self.nms_iou)[: self.max_detections]
            results.append({"boxes": boxes[kept], "scores": flat[candidates][kept].float(), "labels": labels[kept]})
        return results

    def decode(self, prediction: dict[str, Any]) -> list[dict[str, list[Any]]]:
        return [
            {
                "boxes": [[round(v, 2) for v in box] for box in found["boxes"].tolist()],
                "scores": [round(s, 4) for s in found["scores"].tolist()],
                "labels": found["labels"].tolist(),
                "class_names": [self.class_names[label] for label in found["labels"].tolist()],
            }
            for found in self.detect(prediction)
        ]

    def draw(self, image: np.ndarray, decoded: dict[str, list[Any]]) -> np.ndarray:
        """The image with each box outlined in its class colour and labelled ``class score``."""
        picture = Image.fromarray(to_rgb_uint8(image))
        colours = palette(self.num_classes + 1)[1:]  # index 0 of the palette is black
        pen = ImageDraw.Draw(picture)
        for box, score, label in zip(decoded["boxes"], decoded["scores"], decoded["labels"], strict=True):
            colour = tuple(int(c) for c in colours[label])
            pen.rectangle(box, outline=colour, width=1)
            text = f"{self.class_names[label]} {score:.2f}"
            left, top = box[0], max(box[1] - 10, 0)
            text_box = pen.textbbox((left, top), text)
            pen.rectangle(text_box, fill=colour)
            pen.text((left, top), text, fill=(0, 0, 0))
        return np.asarray(picture)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "score_threshold": self.score_threshold,
            "nms_iou": self.nms_iou,
            "max_detections": self.max_detections,
            "pre_nms_top_k": self.pre_nms_top_k,
            "metric_score_threshold": self.metric_score_threshold,
            "strides": list(self.strides) if self.strides is not None else None,
            "center_radius": self.center_radius,
            "size_factor": self.size_factor,
            "head_width": self.head_width,
            "tower_depth": self.tower_depth,
            "multi_label_decode": self.multi_label_decode,
        }
