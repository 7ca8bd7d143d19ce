"""Keypoint average precision from the object keypoint similarity (OKS), exactly as COCO scores keypoints.

The rules of pycocotools' ``COCOeval(iouType="keypoints")`` for one category (COCO keypoints has one,
``person``), the area range ``all`` and at most ``max_detections`` (20) detections per image:

- OKS between a detection and a ground-truth instance (Ronchi and Perona, "Benchmarking and Error Diagnosis
  in Multi-Instance Pose Estimation", ICCV 2017): with ``v = (2 sigma)^2`` per keypoint and ``s`` the
  instance's area, ``e = (dx^2 + dy^2) / v / (s + eps) / 2`` and OKS = mean of ``exp(-e)`` over the instance's
  labelled keypoints (visibility > 0). An instance without a labelled keypoint is ignored (it can be matched,
  but neither counts as a miss nor makes its match a hit); were it scored, COCO measures each predicted
  keypoint's distance to a box three times the instance's box, centred on it.
- Per image, detections in decreasing score (stable order for ties), cut to ``max_detections``; at each OKS
  threshold 0.50:0.05:0.95, each detection in turn takes the unmatched instance of highest OKS at least the
  threshold, preferring instances that are not ignored; a detection matched to an ignored instance is
  ignored.
- Over the split: the detections of every image sorted by score, cumulative true and false positives,
  precision made monotone, read at the 101 recall levels 0:0.01:1 (0 beyond the largest recall reached);
  AP is the mean over thresholds and recall levels, AP50 and AP75 at one threshold. NaN when no instance is
  scored (COCO prints -1).

The test checks these numbers against pycocotools on random cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the 17 COCO person keypoints' OKS sigmas (nose, eyes, ears, shoulders, elbows, wrists, hips, knees,
#: ankles), from pycocotools' ``Params.kpt_oks_sigmas``
COCO_SIGMAS: tuple[float, ...] = tuple(
    s / 10.0
    for s in (0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89)
)
OKS_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_LEVELS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class ImageKeypoints:
    """One image's instances (ground truth) or detections.

    ``keypoints`` is ``[N, K, 3]`` (x, y, v); for ground truth v is COCO's visibility (0 unlabelled, 1 labelled
    but hidden, 2 visible), for detections it is unused. ``boxes`` ``[N, 4]`` (x, y, w, h) and ``areas``
    ``[N]`` are the ground truth's (COCO takes the segment area); ``scores`` ``[N]`` the detections'.
    """

    keypoints: np.ndarray
    boxes: np.ndarray | None = None
    areas: np.ndarray | None = None
    scores: np.ndarray | None = None


def oks(detections: np.ndarray, truth: ImageKeypoints, sigmas: np.ndarray) -> np.ndarray:
    """``[D, G]`` OKS between detected keypoints ``[D, K, 3]`` and the ground-truth instances of an image."""
    assert truth.boxes is not None and truth.areas is not None
    variances = (2.0 * sigmas) ** 2
    result = np.zeros((len(detections), len(truth.keypoints)))
    for j, (instance, box, area) in enumerate(zip(truth.keypoints, truth.boxes, truth.areas, strict=True)):
        labelled = instance[:, 2] > 0
        if labelled.any():
            dx = detections[:, :, 0] - instance[:, 0]
            dy = detections[:, :, 1] - instance[:, 1]
        else:  # COCO's rule for an instance without labelled keypoints: distance to a box 3x its own
            x0, x1 = box[0] - box[2], box[0] + 2 * box[2]
            y0, y1 = box[1] - box[3], box[1] + 2 * box[3]
            zero = np.zeros_like(detections[:, :, 0])
            dx = np.maximum(zero, x0 - detections[:, :, 0]) + np.maximum(zero, detections[:, :, 0] - x1)
            dy = np.maximum(zero, y0 - detections[:, :, 1]) + np.maximum(zero, detections[:, :, 1] - y1)
        e = (dx**2 + dy**2) / variances / (area + np.spacing(1)) / 2
        if labelled.any():
            e = e[:, labelled]
        result[:, j] = np.exp(-e).sum(axis=1) / e.shape[1]
    return result


def _match_image(
    truth: ImageKeypoints, detected: ImageKeypoints, sigmas: np.ndarray, max_detections: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Scores ``[D]``, matched ``[T, D]`` and ignored ``[T, D]`` of an image's kept detections, and its number
    of scored (not ignored) instances."""
    assert detected.scores is not None
    order = np.argsort(-detected.scores, kind="mergesort")[:max_detections]
    scores = detected.scores[order]
    ignore = (truth.keypoints[:, :, 2] > 0).sum(axis=1) == 0
    gt_order = np.argsort(ignore, kind="mergesort")
    ignore = ignore[gt_order]
    similarity = oks(detected.keypoints[order], truth, sigmas)[:, gt_order] if len(order) and len(ignore) else None
    matched = np.zeros((len(OKS_THRESHOLDS), len(order)), dtype=bool)
    ignored = np.zeros((len(OKS_THRESHOLDS), len(order)), dtype=bool)
    if similarity is not None:
        for t, threshold in enumerate(OKS_THRESHOLDS):
            taken = np.zeros(len(ignore), dtype=bool)
            for d in range(len(order)):
                best, chosen = min(threshold, 1 - 1e-10), -1
                for g in range(len(ignore)):
                    if taken[g]:
                        continue
                    if chosen > -1 and not ignore[chosen] and ignore[g]:
                        break
                    if similarity[d, g] < best:
                        continue
                    best, chosen = similarity[d, g], g
                if chosen == -1:
                    continue
                taken[chosen] = True
                matched[t, d] = True
                ignored[t, d] = ignore[chosen]
    return scores, matched, ignored, int((~ignore).sum())


def keypoint_ap(
    truths: Sequence[ImageKeypoints],
    detections: Sequence[ImageKeypoints],
    sigmas: Sequence[float] = COCO_SIGMAS,
    max_detections: int = 20,
) -> dict[str, float]:
    """COCO keypoint ``ap``, ``ap50`` and ``ap75`` over images given as parallel sequences (module docstring)."""
    sigma = np.asarray(sigmas, dtype=np.float64)
    per_image = [_match_image(t, d, sigma, max_detections) for t, d in zip(truths, detections, strict=True)]
    scored = sum(count for *_, count in per_image)
    if scored == 0:
        return {"ap": float("nan"), "ap50": float("nan"), "ap75": float("nan")}
    scores = np.concatenate([s for s, *_ in per_image])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([m for _, m, _, _ in per_image], axis=1)[:, order]
    ignored = np.concatenate([i for _, _, i, _ in per_image], axis=1)[:, order]
    precision = np.zeros((len(OKS_THRESHOLDS), len(RECALL_LEVELS)))
    for t in range(len(OKS_THRESHOLDS)):
        tp = np.cumsum(matched[t] & ~ignored[t]).astype(np.float64)
        fp = np.cumsum(~matched[t] & ~ignored[t]).astype(np.float64)
        recall = tp / scored
        prec = tp / (fp + tp + np.spacing(1))
        prec = np.maximum.accumulate(prec[::-1])[::-1] if prec.size else prec
        where = np.searchsorted(recall, RECALL_LEVELS, side="left")
        inside = where < len(prec)
        precision[t, inside] = prec[where[inside]]
    return {
        "ap": float(precision.mean()),
        "ap50": float(precision[0].mean()),
        "ap75": float(precision[5].mean()),
    }


class KeypointMetric:
    """Accumulates a split's instances and detections, then gives COCO's keypoint ``ap``, ``ap50`` and ``ap75``.

    ``detect(prediction)`` turns a batch prediction into one ``(keypoints [T, K, 2], scores [T])`` pair per
    image; a target is ``{"keypoints": [N, K, 3], "boxes": [N, 4]}`` (x1, y1, x2, y2). The OKS area of an instance
    is its box's area (COCO takes the segment's, which a box target does not give).
    """

    def __init__(
        self,
        detect: Callable[[Any], Sequence[tuple[np.ndarray, np.ndarray]]],
        sigmas: Sequence[float],
        max_detections: int = 20,
    ) -> None:
        self.detect = detect
        self.sigmas = tuple(sigmas)
        self.max_detections = max_detections
        self.reset()

    def reset(self) -> None:
        self.truths: list[ImageKeypoints] = []
        self.detections: list[ImageKeypoints] = []

    def update(self, prediction: Any, target: Sequence[dict[str, Any]], valid: Any) -> None:
        found = self.detect(prediction)
        for (keypoints, scores), truth, ok in zip(found, target, [bool(v) for v in valid], strict=True):
            if not ok:
                continue
            corners = truth["boxes"].detach().cpu().double().numpy().reshape(-1, 4)
            xywh = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
            self.truths.append(
                ImageKeypoints(
                    keypoints=truth["keypoints"].detach().cpu().double().numpy().reshape(len(xywh), -1, 3),
                    boxes=xywh,
                    areas=xywh[:, 2] * xywh[:, 3],
                )
            )
            padded = np.concatenate([keypoints, np.zeros((*keypoints.shape[:2], 1))], axis=2)
            self.detections.append(ImageKeypoints(keypoints=padded, scores=np.asarray(scores, dtype=np.float64)))

    def compute(self) -> dict[str, float]:
        return keypoint_ap(self.truths, self.detections, self.sigmas, self.max_detections)

    def to(self, device: Any) -> KeypointMetric:
        return self
