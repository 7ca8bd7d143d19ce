"""Keypoints: per-instance keypoints found bottom-up in CenterNet's multi-pose style, scored by COCO's OKS AP.

The head (:mod:`~mtlvision.tasks.keypoint_head`), targets and loss (:mod:`~mtlvision.tasks.keypoint_targets`) and
decoding (:mod:`~mtlvision.tasks.keypoint_decode`) follow Zhou, Wang and Krähenbühl, "Objects as Points" (2019, §4);
the metric is :mod:`~mtlvision.tasks.keypoint_metric` (equal to pycocotools' ``COCOeval(iouType="keypoints")``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from mtlvision.tasks.base import TargetKind, Task, require
from mtlvision.tasks.drawing import palette, to_rgb_uint8
from mtlvision.tasks.keypoint_decode import decode_instances
from mtlvision.tasks.keypoint_head import KeypointHead
from mtlvision.tasks.keypoint_metric import COCO_SIGMAS, KeypointMetric
from mtlvision.tasks.keypoint_targets import encode_targets, keypoint_loss
from mtlvision.tasks.registry import TASKS
from mtlvision.validation import config_error_from

#: COCO's 17 person keypoints, in its order (their OKS sigmas are ``COCO_SIGMAS``)
COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)  # fmt: skip
KeypointTarget = dict[str, Tensor]


class KeypointSettings(BaseModel):
    """The keypoints task's parameters (``tasks: [{name: ..., <key>: ...}]``), validated with the key named."""

    model_config = ConfigDict(extra="forbid")

    keypoint_names: list[str] = Field(min_length=1, description="one name per keypoint, in the targets' order")
    flip_pairs: list[tuple[str, str]] = Field(
        default_factory=list, description="pairs of keypoints that a horizontal flip swaps (left and right)"
    )
    sigmas: list[float] | None = Field(
        None, description="OKS sigma per keypoint; default: COCO's when the names are COCO's 17"
    )
    skeleton: list[tuple[str, str]] = Field(default_factory=list, description="pairs joined by a line when drawn")
    max_instances: int = Field(20, ge=1, description="instances decoded per image (COCO scores at most 20)")
    score_threshold: float = Field(0.3, ge=0.0, le=1.0, description="centre score of the instances predict shows")
    keypoint_threshold: float = Field(0.1, ge=0.0, le=1.0, description="keypoint peaks a keypoint may snap to")
    stride: int | None = Field(None, ge=1, description="output stride; default: the finest backbone level >= 4")
    head_width: int = Field(64, ge=1, description="channels of the head")

    @model_validator(mode="after")
    def _consistent(self) -> KeypointSettings:
        names = self.keypoint_names
        if len(set(names)) != len(names):
            raise ValueError(f"keypoint_names holds duplicates: {names}")
        paired = [name for pair in self.flip_pairs for name in pair]
        for field, pairs in (("flip_pairs", self.flip_pairs), ("skeleton", self.skeleton)):
            unknown = sorted({name for pair in pairs for name in pair} - set(names))
            if unknown:
                raise ValueError(f"{field} names unknown keypoints {unknown}; known: {names}")
        if len(set(paired)) != len(paired) or any(a == b for a, b in self.flip_pairs):
            raise ValueError(f"flip_pairs must pair distinct keypoints, each at most once: {self.flip_pairs}")
        if self.sigmas is None:
            if tuple(names) != COCO_KEYPOINT_NAMES:
                raise ValueError("sigmas (one OKS sigma per keypoint) are needed unless the names are COCO's 17")
            self.sigmas = list(COCO_SIGMAS)
        if len(self.sigmas) != len(names) or not all(0 < s < float("inf") for s in self.sigmas):
            raise ValueError(f"sigmas must hold {len(names)} positive numbers, one per keypoint, got {self.sigmas}")
        return self


def flip_permutation(names: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Index ``permutation[i]``: the keypoint whose mirror image becomes keypoint ``i`` after a horizontal flip."""
    permutation = list(range(len(names)))
    for first, second in pairs:
        i, j = names.index(first), names.index(second)
        permutation[i], permutation[j] = j, i
    return permutation


def default_stride(feature_strides: Sequence[int]) -> int:
    """The finest backbone stride of at least 4 (CenterNet's), else the coarsest."""
    return min((s for s in feature_strides if s >= 4), default=max(feature_strides))


@TASKS.register(
    "keypoints",
    "Per-instance keypoints, bottom-up CenterNet multi-pose (focal loss on heatmaps, L1 offsets); COCO OKS AP.",
    citation="Zhou, Wang and Krähenbühl, Objects as Points, 2019; Ronchi and Perona, ICCV 2017 (OKS)",
)
class Keypoints(Task):
    """``K`` named keypoints per instance. The target of an image is ``{"keypoints": [N, K, 3], "boxes": [N, 4]}``
    (float32; x, y, v in pixels, v as COCO: 0 unlabelled, 1 labelled but hidden, 2 visible; boxes x1, y1, x2, y2 in
    pixel-edge coordinates, as detection's). The loss and decoding are CenterNet's (see the modules named in this
    module's docstring); the metric is COCO's keypoint AP with each instance's box area as its OKS area.
    Parameters: :class:`KeypointSettings`."""

    kind: ClassVar[str] = "keypoints"
    target_kind: ClassVar[TargetKind] = TargetKind.KEYPOINTS
    level: ClassVar[Literal["image", "dense"]] = "dense"
    default_head: ClassVar[str] = "centernet"
    metric_directions: ClassVar[dict[str, bool]] = {"ap": True, "ap50": True, "ap75": True}
    primary_metric: ClassVar[str] = "ap"

    def __init__(self, name: str, keypoint_names: Sequence[str] | None = None, **settings: Any) -> None:
        super().__init__(name)
        try:
            self.settings = KeypointSettings(keypoint_names=keypoint_names, **settings)
        except ValidationError as err:
            raise config_error_from(
                err, f"tasks.{name}", f"Invalid keypoints task {name!r}", allowed=KeypointSettings.model_fields
            ) from None
        self.keypoint_names = list(self.settings.keypoint_names)
        self.num_keypoints = len(self.keypoint_names)
        assert self.settings.sigmas is not None  # the validator fills it
        self.sigmas = list(self.settings.sigmas)
        self.flip_permutation = flip_permutation(self.keypoint_names, self.settings.flip_pairs)

    # ----------------------------------------------------------------------------------------- model side
    @property
    def output_channels(self) -> int:
        """Centre heatmap (1), centre offset (2), size (2), joints (2K), keypoint heatmaps (K), keypoint offset (2)."""
        return 7 + 3 * self.num_keypoints

    def build_custom_head(self, feature_channels: Sequence[int], feature_strides: Sequence[int]) -> nn.Module:
        stride = self.settings.stride if self.settings.stride is not None else default_stride(feature_strides)
        return KeypointHead(feature_channels, feature_strides, self.num_keypoints, stride, self.settings.head_width)

    # ------------------------------------------------------------------------------------------ training
    def loss(self, prediction: dict[str, Any], target: Sequence[KeypointTarget], valid: Tensor) -> Tensor:
        """The sum of :func:`~mtlvision.tasks.keypoint_targets.keypoint_loss`'s terms."""
        return sum(self.loss_terms(prediction, target, valid).values(), torch.zeros((), device=valid.device))

    def loss_terms(
        self, prediction: dict[str, Any], target: Sequence[KeypointTarget], valid: Tensor
    ) -> dict[str, Tensor]:
        """Each weighted term of the loss, by name."""
        center: Tensor = prediction["center"]
        height, width = int(center.shape[-2]), int(center.shape[-1])
        encoded = encode_targets(target, self.num_keypoints, int(prediction["stride"]), height, width, center.device)
        return keypoint_loss(prediction, encoded, valid)

    def metric(self) -> KeypointMetric:
        return KeypointMetric(self._for_metric, self.sigmas, self.settings.max_instances)

    def _for_metric(self, prediction: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        found = self.detect(prediction)
        return [(k.keypoints.numpy().astype(np.float64), k.scores.numpy().astype(np.float64)) for k in found]

    # ------------------------------------------------------------------------------------------- data side
    def placeholder_target(self, height: int, width: int) -> KeypointTarget:
        return {"keypoints": torch.zeros((0, self.num_keypoints, 3)), "boxes": torch.zeros((0, 4))}

    def check_target(self, target: Any, where: str, image_size: tuple[int, int] | None = None) -> None:
        """Keypoints float ``[N, K, 3]`` with finite coordinates and v in {0, 1, 2}; boxes ``[N, 4]`` non-empty and
        not negative."""
        require(
            isinstance(target, dict) and {"keypoints", "boxes"} <= set(target),
            where,
            f"task {self.name!r} needs a dict with 'keypoints' and 'boxes', got {type(target).__name__}",
        )
        keypoints, boxes = target["keypoints"], target["boxes"]
        require(
            isinstance(boxes, Tensor) and boxes.ndim == 2 and boxes.shape[1] == 4 and boxes.is_floating_point(),
            where,
            f"task {self.name!r}: boxes must be a float tensor [N, 4] (x1, y1, x2, y2)",
        )
        shape = (boxes.shape[0], self.num_keypoints, 3)
        require(
            isinstance(keypoints, Tensor) and tuple(keypoints.shape) == shape and keypoints.is_floating_point(),
            where,
            f"task {self.name!r}: keypoints must be a float tensor {list(shape)} (instances, keypoints, x y v), got "
            f"{tuple(keypoints.shape) if isinstance(keypoints, Tensor) else type(keypoints).__name__}",
        )
        require(
            bool(torch.isfinite(keypoints).all() and torch.isfinite(boxes).all()),
            where,
            f"task {self.name!r}: a keypoint or box coordinate is not finite",
        )
        visibility = keypoints[..., 2]
        bad = visibility[(visibility != 0) & (visibility != 1) & (visibility != 2)]
        require(
            bad.numel() == 0,
            where,
            f"task {self.name!r}: visibility must be 0 (unlabelled), 1 (hidden) or 2 (visible), got "
            f"{torch.unique(bad)[:5].tolist()}",
        )
        for row, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            require(
                x2 > x1 and y2 > y1 and min(x1, y1) >= 0,
                where,
                f"task {self.name!r}: box {row} {[x1, y1, x2, y2]} is empty or starts outside the image",
            )

    def collate(self, targets: Sequence[KeypointTarget]) -> list[KeypointTarget]:
        """A list of per-image dicts: images hold different numbers of instances."""
        return list(targets)

    # ----------------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def detect(self, prediction: dict[str, Any], score_threshold: float = 0.0) -> list[Any]:
        """Per image, its instances of centre score at least ``score_threshold`` (at most ``max_instances``) as a
        :class:`~mtlvision.tasks.keypoint_decode.DecodedInstances` of one image, on the CPU."""
        found = decode_instances(
            prediction, self.settings.max_instances, self.settings.keypoint_threshold, int(prediction["stride"])
        )
        results = []
        for i in range(found.scores.shape[0]):
            keep = found.scores[i] >= score_threshold
            results.append(
                type(found)(
                    scores=found.scores[i][keep].cpu(),
                    boxes=found.boxes[i][keep].cpu(),
                    keypoints=found.keypoints[i][keep].cpu(),
                    keypoint_scores=found.keypoint_scores[i][keep].cpu(),
                )
            )
        return results

    def decode(self, prediction: dict[str, Any]) -> list[dict[str, Any]]:
        """Per image: ``scores``, ``boxes`` (x1, y1, x2, y2) and ``keypoints`` (per instance, per keypoint ``[x, y,
        score]``, the score of the heatmap peak it snapped to, 0 where the regressed position was kept) of the
        instances scoring at least ``score_threshold``, and ``keypoint_names``."""
        return [
            {
                "scores": [round(s, 4) for s in found.scores.tolist()],
                "boxes": [[round(v, 2) for v in box] for box in found.boxes.tolist()],
                "keypoints": [
                    [[round(x, 2), round(y, 2), round(s, 4)] for (x, y), s in zip(points, scores, strict=True)]
                    for points, scores in zip(found.keypoints.tolist(), found.keypoint_scores.tolist(), strict=True)
                ],
                "keypoint_names": self.keypoint_names,
            }
            for found in self.detect(prediction, self.settings.score_threshold)
        ]

    def draw(self, image: np.ndarray, decoded: dict[str, Any]) -> np.ndarray:
        """The image with each instance's box (thin, grey), its skeleton's lines and its keypoints as dots in their
        keypoint's colour."""
        picture = Image.fromarray(to_rgb_uint8(image))
        pen = ImageDraw.Draw(picture)
        colours = [tuple(int(c) for c in colour) for colour in palette(self.num_keypoints + 1)[1:]]
        index = {name: i for i, name in enumerate(self.keypoint_names)}
        for box, points in zip(decoded["boxes"], decoded["keypoints"], strict=True):
            pen.rectangle(box, outline=(160, 160, 160), width=1)
            for first, second in self.settings.skeleton:
                a, b = points[index[first]], points[index[second]]
                pen.line([(a[0], a[1]), (b[0], b[1])], fill=(255, 255, 255), width=1)
            for (x, y, _), colour in zip(points, colours, strict=True):
                pen.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=colour)
        return np.asarray(picture)

    def describe(self) -> dict[str, Any]:
        settings = self.settings.model_dump()
        settings["flip_pairs"] = [list(pair) for pair in settings["flip_pairs"]]
        settings["skeleton"] = [list(pair) for pair in settings["skeleton"]]
        return {"name": self.name, "kind": self.kind, **settings}
