"""COCO-style detection metrics accumulated over a whole split, computed by pycocotools' COCOeval itself.

The boxes of every valid image are kept (as float64) until :meth:`DetectionMetric.compute`, which hands them
to :class:`pycocotools.cocoeval.COCOeval` in COCO's own format with its default parameters: IoU thresholds
``np.linspace(.5, .95, 10)`` and recall thresholds ``np.linspace(0, 1, 101)`` in float64, at most 100
detections per image, area range "all". The numbers are therefore COCOeval's, figure for figure: ``map_50``
(AP at IoU 0.5), ``map`` (AP averaged over IoU 0.50:0.05:0.95) and ``recall`` (AR with at most 100
detections per image), each averaged over the classes that have ground truth, and the AP@0.5 of each such
class (``ap_50/<class>``). :meth:`DetectionMetric.per_class` gives both per-class APs.

(torchmetrics' ``MeanAveragePrecision`` is not used: it builds the thresholds with ``torch.linspace`` in
float32, e.g. 0.6000000238 instead of 0.6, so that a recall landing exactly on a threshold, 3 of 5 boxes,
is counted on the wrong side and AP differs from COCOeval's by up to 10⁻².)
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

Detections = list[dict[str, Tensor]]


@dataclass(frozen=True)
class _Image:
    """One valid image's ground truth and detections, xyxy boxes in float64."""

    truth_boxes: np.ndarray
    truth_labels: np.ndarray
    crowd: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def _array(values: Any, dtype: type, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().to("cpu")
        values = values.double() if dtype is np.float64 else values
        values = values.numpy()
    array: np.ndarray = np.asarray(values, dtype=dtype)
    return array.reshape(shape) if shape is not None else array.reshape(-1)


class DetectionMetric:
    """mAP@0.5, mAP@[0.5:0.95] and mAR@100 of the images whose detection label is valid.

    ``detect`` turns the model's raw prediction for a batch into one ``{"boxes", "scores", "labels"}`` dict
    per image (see :meth:`mtlvision.tasks.detection.Detection.detect`). Targets are
    ``{"boxes": [N, 4] xyxy, "labels": [N]}``, with an optional ``"iscrowd"`` [N] (crowd regions, which
    COCOeval matches without counting them as misses or hits).
    """

    def __init__(self, detect: Callable[[Any], Detections], class_names: Sequence[str]) -> None:
        self._detect = detect
        self.class_names = list(class_names)
        self._images: list[_Image] = []
        self._last: COCOeval | None = None

    def update(self, prediction: Any, target: Sequence[dict[str, Tensor]], valid: Tensor) -> None:
        keep = [i for i, flag in enumerate(valid.tolist()) if flag]
        if not keep:
            return
        detections = self._detect(prediction)
        for i in keep:
            truth, found = target[i], detections[i]
            count = int(_array(truth["labels"], np.int64).size)
            crowd = truth.get("iscrowd")
            self._images.append(
                _Image(
                    truth_boxes=_array(truth["boxes"], np.float64, (-1, 4)),
                    truth_labels=_array(truth["labels"], np.int64),
                    crowd=np.zeros(count, dtype=bool) if crowd is None else _array(crowd, np.int64).astype(bool),
                    boxes=_array(found["boxes"], np.float64, (-1, 4)),
                    scores=_array(found["scores"], np.float64),
                    labels=_array(found["labels"], np.int64),
                )
            )
        self._last = None

    def _evaluation(self) -> COCOeval | None:
        """COCOeval run (evaluate, accumulate, summarize) on everything seen since the last reset; None
        before any valid image (COCOeval cannot run on none)."""
        if self._last is not None or not self._images:
            return self._last
        labels = set(range(len(self.class_names)))
        for image in self._images:
            labels.update(image.truth_labels.tolist(), image.labels.tolist())
        categories = [{"id": label, "name": str(label)} for label in sorted(labels)]
        images = [{"id": index} for index in range(1, len(self._images) + 1)]
        truths: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for image_id, image in enumerate(self._images, start=1):
            for box, label, crowd in zip(image.truth_boxes, image.truth_labels.tolist(), image.crowd.tolist()):
                truths.append(
                    {
                        "id": len(truths) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        **_coco_box(box),
                        "iscrowd": int(crowd),
                    }
                )
            for box, score, label in zip(image.boxes, image.scores.tolist(), image.labels.tolist()):
                # as COCO.loadRes builds a bbox result: id from 1 in order, area w·h, not a crowd
                results.append(
                    {
                        "id": len(results) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        **_coco_box(box),
                        "iscrowd": 0,
                        "score": score,
                    }
                )
        with contextlib.redirect_stdout(io.StringIO()):
            ground, detected = COCO(), COCO()
            ground.dataset = {"images": images, "annotations": truths, "categories": categories}
            detected.dataset = {"images": images, "annotations": results, "categories": categories}
            ground.createIndex()
            detected.createIndex()
            evaluation = COCOeval(ground, detected, "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        self._last = evaluation
        return evaluation

    def compute(self) -> dict[str, float]:
        """``map_50``, ``map``, ``recall`` (COCOeval's ``stats[1]``, ``stats[0]``, ``stats[8]``; -1 as in
        COCOeval when no image has ground truth), and ``ap_50/<class>`` for every class with ground truth
        (reported beside the means; Δm and model selection use only the three means)."""
        evaluation = self._evaluation()
        stats = evaluation.stats if evaluation is not None else np.full(12, -1.0)
        result = {"map_50": float(stats[1]), "map": float(stats[0]), "recall": float(stats[8])}
        for name, values in self.per_class().items():
            if values["ap_50"] is not None:
                result[f"ap_50/{name}"] = values["ap_50"]
        return result

    def per_class(self) -> dict[str, dict[str, float | None]]:
        """``{class name: {"ap": AP@[.5:.95], "ap_50": AP@.5}}``; ``None`` for a class without ground truth.

        Read from COCOeval's precision array (IoU x recall x class x area x max-detections) exactly as its
        ``summarize`` does: the mean over the entries that are not -1, area "all", 100 detections.
        """
        evaluation = self._evaluation()
        result: dict[str, dict[str, float | None]] = {name: {"ap": None, "ap_50": None} for name in self.class_names}
        if evaluation is None:
            return result
        precision = evaluation.eval["precision"]
        area = evaluation.params.areaRngLbl.index("all")
        most = evaluation.params.maxDets.index(100)
        first = int(np.flatnonzero(evaluation.params.iouThrs == 0.5)[0])
        for column, label in enumerate(evaluation.params.catIds):
            per_iou = precision[:, :, column, area, most]
            name = self.class_names[label] if 0 <= label < len(self.class_names) else str(label)
            if name in result or (per_iou > -1).any():
                result[name] = {"ap": _mean_valid(per_iou), "ap_50": _mean_valid(per_iou[first])}
        return result

    def reset(self) -> None:
        self._images = []
        self._last = None

    def to(self, device: torch.device | str) -> DetectionMetric:
        # The COCO evaluation runs on the CPU; update() moves the detections there.
        return self


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else None


def _coco_box(box: Any) -> dict[str, Any]:
    """An xyxy box as COCO's ``bbox`` (x, y, width, height, float64) and its ``area`` (width · height)."""
    x, y, w, h = float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])
    return {"bbox": [x, y, w, h], "area": w * h}
