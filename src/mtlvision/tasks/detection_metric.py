"""COCO-style detection metrics accumulated over a whole split.

Wraps :class:`torchmetrics.detection.MeanAveragePrecision` with the pycocotools backend, so the numbers are
COCOeval's: ``map_50`` (AP at IoU 0.5), ``map`` (AP averaged over IoU 0.50:0.05:0.95) and ``recall``
(AR with at most 100 detections per image), each averaged over the classes that have ground truth, and
the AP@0.5 of each such class (``ap_50/<class>``). :meth:`DetectionMetric.per_class` gives both per-class APs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

Detections = list[dict[str, Tensor]]


class DetectionMetric:
    """mAP@0.5, mAP@[0.5:0.95] and mAR@100 of the images whose detection label is valid.

    ``detect`` turns the model's raw prediction for a batch into one ``{"boxes", "scores", "labels"}`` dict
    per image (see :meth:`mtlvision.tasks.detection.Detection.detect`).
    """

    def __init__(self, detect: Callable[[Any], Detections], class_names: Sequence[str]) -> None:
        self._detect = detect
        self.class_names = list(class_names)
        self._map = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", extended_summary=True, backend="pycocotools"
        )
        self._last: dict[str, Any] | None = None

    def update(self, prediction: Any, target: Sequence[dict[str, Tensor]], valid: Tensor) -> None:
        detections = self._detect(prediction)
        keep = [i for i, flag in enumerate(valid.tolist()) if flag]
        if not keep:
            return
        preds = [{k: v.detach().cpu() for k, v in detections[i].items()} for i in keep]
        targets = [{"boxes": target[i]["boxes"].cpu().float(), "labels": target[i]["labels"].cpu()} for i in keep]
        self._map.update(preds, targets)
        self._last = None

    def _summary(self) -> dict[str, Any]:
        if self._last is None:
            self._last = self._map.compute()
        return self._last

    def compute(self) -> dict[str, float]:
        """``map_50``, ``map``, ``recall``, and ``ap_50/<class>`` for every class with ground truth (reported
        beside the means; Δm and model selection use only the three means)."""
        summary = self._summary()
        result = {
            "map_50": float(summary["map_50"]),
            "map": float(summary["map"]),
            "recall": float(summary["mar_100"]),
        }
        for name, values in self.per_class().items():
            if values["ap_50"] is not None:
                result[f"ap_50/{name}"] = values["ap_50"]
        return result

    def per_class(self) -> dict[str, dict[str, float | None]]:
        """``{class name: {"ap": AP@[.5:.95], "ap_50": AP@.5}}``; ``None`` for a class without ground truth.

        Read from COCOeval's precision array (IoU x recall x class x area x max-detections) exactly as its
        ``summarize`` does: the mean over the entries that are not -1, area "all", 100 detections.
        """
        summary = self._summary()
        precision = summary.get("precision")
        classes = summary["classes"].reshape(-1).tolist()
        result: dict[str, dict[str, float | None]] = {
            name: {"ap": None, "ap_50": None} for name in self.class_names
        }
        if not isinstance(precision, Tensor) or precision.ndim != 5:
            return result
        for column, label in enumerate(classes):
            per_iou = precision[:, :, column, 0, -1]
            name = self.class_names[label] if 0 <= label < len(self.class_names) else str(label)
            result[name] = {"ap": _mean_valid(per_iou), "ap_50": _mean_valid(per_iou[0])}
        return result

    def reset(self) -> None:
        self._map.reset()
        self._last = None

    def to(self, device: torch.device | str) -> DetectionMetric:
        # The COCO evaluation runs on the CPU; update() moves the detections there.
        return self


def _mean_valid(values: Tensor) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.numel() else None
