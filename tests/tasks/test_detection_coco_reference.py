"""Issue 15: detection AP equals pycocotools' COCOeval, run here directly in the usual way (a ground-truth
COCO object and ``loadRes`` on the detections), to 1e-6 for every figure, per-class APs included, on random
sets with empty images, crowded and tiny boxes, crowd regions, tied scores and images over the
100-detection limit; and on the five-box case whose recall lands exactly on a recall threshold."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtlvision.tasks.detection_metric import DetectionMetric

CLASSES = ["a", "b", "c", "d"]


def reference(truths: list[dict], detections: list[dict], classes: list[str]) -> COCOeval:
    """COCOeval with its default parameters on the same boxes, xyxy turned into COCO's xywh in float64."""
    images, annotations, results = [], [], []
    for image_id, (truth, found) in enumerate(zip(truths, detections, strict=True), start=1):
        images.append({"id": image_id, "width": 200, "height": 200})
        crowd = truth.get("iscrowd", torch.zeros(len(truth["labels"]), dtype=torch.int64)).tolist()
        for box, label, is_crowd in zip(truth["boxes"].tolist(), truth["labels"].tolist(), crowd, strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": int(is_crowd),
                }
            )
        for box, score, label in zip(
            found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "score": score,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in enumerate(classes)],
        }
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def random_set(seed: int, images: int = 50) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    truths, detections = [], []
    for index in range(images):
        kind = rng.choice(["empty", "normal", "crowded", "tiny"], p=[0.1, 0.5, 0.2, 0.2])
        count = {
            "empty": 0,
            "normal": int(rng.integers(1, 6)),
            "crowded": int(rng.integers(8, 20)),
            "tiny": int(rng.integers(1, 8)),
        }[kind]
        if kind == "crowded":  # many overlapping boxes around one spot
            xy = rng.normal(80, 6, size=(count, 2))
            wh = rng.uniform(15, 40, size=(count, 2))
        elif kind == "tiny":
            xy = rng.uniform(0, 190, size=(count, 2))
            wh = rng.uniform(0.5, 4.0, size=(count, 2))
        else:
            xy = rng.uniform(0, 150, size=(count, 2))
            wh = rng.uniform(5, 50, size=(count, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, len(CLASSES), size=count)
        crowd = (rng.random(count) < 0.08).astype(np.int64)
        truths.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(labels),
                "iscrowd": torch.tensor(crowd),
            }
        )
        found_boxes, found_labels = [], []
        for box, label in zip(boxes, labels, strict=True):
            if rng.random() < 0.2:
                continue  # a miss
            jitter = 0.1 * (box[2:] - box[:2]).mean()
            for _ in range(1 + int(rng.random() < 0.3)):  # sometimes a duplicate
                found_boxes.append(box + rng.normal(0, jitter, size=4))
                found_labels.append(label if rng.random() < 0.85 else rng.integers(0, len(CLASSES)))
        false_positives = 120 if index == 7 else int(rng.integers(0, 4))  # image 7 exceeds maxDets = 100
        for _ in range(false_positives):
            corner = rng.uniform(0, 180, size=2)
            found_boxes.append(np.concatenate([corner, corner + rng.uniform(1, 30, size=2)]))
            found_labels.append(rng.integers(0, len(CLASSES)))
        found = np.array(found_boxes, dtype=np.float32).reshape(-1, 4)
        found[:, 2:] = np.maximum(found[:, 2:], found[:, :2] + 0.25)
        scores = np.round(rng.uniform(0.05, 1.0, size=len(found)), 2)  # two decimals: ties happen
        detections.append(
            {
                "boxes": torch.tensor(found),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(np.array(found_labels, dtype=np.int64)),
            }
        )
    return truths, detections


def ours(truths: list[dict], detections: list[dict], classes: list[str], batches: int = 3) -> DetectionMetric:
    metric = DetectionMetric(lambda found: found, classes)
    for chunk in np.array_split(np.arange(len(truths)), batches):
        picked = [int(i) for i in chunk]
        metric.update(
            [detections[i] for i in picked], [truths[i] for i in picked], torch.ones(len(picked), dtype=torch.bool)
        )
    return metric


def assert_every_figure_equal(metric: DetectionMetric, evaluation: COCOeval, classes: list[str]) -> None:
    figures = metric.compute()
    assert abs(figures["map"] - evaluation.stats[0]) <= 1e-6
    assert abs(figures["map_50"] - evaluation.stats[1]) <= 1e-6
    assert abs(figures["recall"] - evaluation.stats[8]) <= 1e-6
    precision = evaluation.eval["precision"][:, :, :, 0, -1]  # [IoU, recall, class], area all, 100 detections
    per_class = metric.per_class()
    for column, name in enumerate(classes):
        values = precision[:, :, column]
        if not (values > -1).any():
            assert per_class[name] == {"ap": None, "ap_50": None} and f"ap_50/{name}" not in figures
            continue
        ap, ap_50 = values[values > -1].mean(), values[0][values[0] > -1].mean()
        assert abs(per_class[name]["ap"] - ap) <= 1e-6, name
        assert abs(per_class[name]["ap_50"] - ap_50) <= 1e-6, name
        assert abs(figures[f"ap_50/{name}"] - ap_50) <= 1e-6, name


@pytest.mark.parametrize("seed", range(4))
def test_every_figure_equals_cocoevals_on_random_sets(seed: int) -> None:
    truths, detections = random_set(seed)
    assert any(len(t["labels"]) == 0 for t in truths) and len(detections[7]["scores"]) > 100
    evaluation = reference(truths, detections, CLASSES)
    assert_every_figure_equal(ours(truths, detections, CLASSES), evaluation, CLASSES)


def five_boxes() -> tuple[list[dict], list[dict]]:
    """Five ground-truth boxes; detections ranked by score: three hits, two false positives, one more hit
    (the fifth box is missed). Recall reaches 3/5 = 0.6 exactly, a recall threshold of COCOeval."""
    truth = torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10.0, 10.0] for i in range(5)])
    hits = truth[[0, 1, 2]]
    false = torch.tensor([[0.0, 100.0, 10.0, 110.0], [30.0, 100.0, 40.0, 110.0]])
    boxes = torch.cat([hits, false, truth[[3]]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    return (
        [{"boxes": truth, "labels": torch.zeros(5, dtype=torch.int64)}],
        [{"boxes": boxes, "scores": scores, "labels": torch.zeros(6, dtype=torch.int64)}],
    )


def test_five_box_case_equals_cocoeval() -> None:
    # issue 15: torchmetrics' float32 thresholds (0.6000000238, 0.8000000119) gave 0.72607
    truths, detections = five_boxes()
    evaluation = reference(truths, detections, ["a"])
    # precision 1 up to recall 0.6 (61 thresholds, 0.6 included), 2/3 up to 0.8 (20), then 0 (20)
    assert evaluation.stats[1] == pytest.approx((61 + 20 * 2 / 3) / 101, abs=1e-12)
    assert round(float(evaluation.stats[1]), 5) == 0.73597
    metric = ours(truths, detections, ["a"], batches=1)
    assert metric.compute()["map_50"] == pytest.approx(evaluation.stats[1], abs=1e-12)
    assert metric.compute()["map"] == pytest.approx(evaluation.stats[0], abs=1e-12)
    assert_every_figure_equal(metric, evaluation, ["a"])


def test_nothing_seen_gives_cocoevals_no_data_value() -> None:
    metric = DetectionMetric(lambda found: found, CLASSES)
    assert metric.compute() == {"map_50": -1.0, "map": -1.0, "recall": -1.0}
    assert metric.per_class() == {name: {"ap": None, "ap_50": None} for name in CLASSES}
