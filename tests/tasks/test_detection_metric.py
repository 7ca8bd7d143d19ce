"""Detection metrics agree with pycocotools' COCOeval run directly on the same generated predictions."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mtlvision.tasks.detection import Detection
from mtlvision.tasks.detection_metric import DetectionMetric

CLASSES = ["circle", "square", "triangle"]


def generate(seed: int, images: int = 8) -> tuple[list[dict], list[dict]]:
    """Ground truth and imperfect detections: jittered hits, misses, duplicates and false positives."""
    rng = np.random.default_rng(seed)
    truths, detections = [], []
    for _ in range(images):
        count = int(rng.integers(0, 5))
        xy = rng.uniform(0, 40, size=(count, 2))
        wh = rng.uniform(6, 24, size=(count, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, len(CLASSES), size=count)
        truths.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
        found_boxes, found_labels = [], []
        for box, label in zip(boxes, labels):
            if rng.random() < 0.2:
                continue  # a miss
            for _ in range(1 + int(rng.random() < 0.3)):  # sometimes a duplicate
                found_boxes.append(box + rng.normal(0, 2.5, size=4))
                found_labels.append(label if rng.random() < 0.85 else rng.integers(0, len(CLASSES)))
        for _ in range(int(rng.integers(0, 3))):  # false positives
            corner = rng.uniform(0, 50, size=2)
            found_boxes.append(np.concatenate([corner, corner + rng.uniform(4, 14, size=2)]))
            found_labels.append(rng.integers(0, len(CLASSES)))
        found = np.array(found_boxes, dtype=np.float32).reshape(-1, 4)
        found[:, 2:] = np.maximum(found[:, 2:], found[:, :2] + 1)
        detections.append(
            {
                "boxes": torch.tensor(found),
                "scores": torch.tensor(rng.uniform(0.05, 1.0, size=len(found)), dtype=torch.float32),
                "labels": torch.tensor(np.array(found_labels, dtype=np.int64)),
            }
        )
    return truths, detections


def cocoeval(truths: list[dict], detections: list[dict]) -> COCOeval:
    """COCOeval on the same data, built directly in the COCO json format (xywh boxes)."""
    images, annotations, results = [], [], []
    for image_id, (truth, found) in enumerate(zip(truths, detections), start=1):
        images.append({"id": image_id, "width": 64, "height": 64})
        for box, label in zip(truth["boxes"].tolist(), truth["labels"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()):
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
            "categories": [{"id": i, "name": n} for i, n in enumerate(CLASSES)],
        }
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def passthrough_metric() -> DetectionMetric:
    return DetectionMetric(lambda detections: detections, CLASSES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_matches_cocoeval(seed: int) -> None:
    truths, detections = generate(seed)
    metric = passthrough_metric()
    half = len(truths) // 2  # two batches: the metric accumulates over the split
    metric.update(detections[:half], truths[:half], torch.ones(half, dtype=torch.bool))
    metric.update(detections[half:], truths[half:], torch.ones(len(truths) - half, dtype=torch.bool))
    ours = metric.compute()
    reference = cocoeval(truths, detections)
    assert ours["map"] == pytest.approx(reference.stats[0], abs=1e-6)
    assert ours["map_50"] == pytest.approx(reference.stats[1], abs=1e-6)
    assert ours["recall"] == pytest.approx(reference.stats[8], abs=1e-6)
    assert 0.05 < ours["map_50"] < 0.99  # the generated case is neither trivial nor hopeless

    precision = reference.eval["precision"]  # [IoU, recall, class, area, max detections]
    for column, name in enumerate(CLASSES):
        per_iou = precision[:, :, column, 0, -1]
        got = metric.per_class()[name]
        if (per_iou > -1).any():
            assert got["ap"] == pytest.approx(per_iou[per_iou > -1].mean(), abs=1e-6)
            assert got["ap_50"] == pytest.approx(per_iou[0][per_iou[0] > -1].mean(), abs=1e-6)
            assert ours[f"ap_50/{name}"] == pytest.approx(got["ap_50"], abs=1e-9)
        else:
            assert f"ap_50/{name}" not in ours


def test_invalid_images_are_left_out() -> None:
    truths, detections = generate(3)
    garbage = {
        "boxes": torch.tensor([[0.0, 0.0, 60.0, 60.0]]),
        "scores": torch.tensor([0.99]),
        "labels": torch.tensor([0]),
    }
    metric = passthrough_metric()
    valid = torch.tensor([True] * len(truths) + [False])
    metric.update(detections + [garbage], truths + [truths[0]], valid)
    assert metric.compute()["map"] == pytest.approx(cocoeval(truths, detections).stats[0], abs=1e-6)


def test_perfect_detections_score_one_and_reset_clears() -> None:
    truths, _ = generate(4)
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in truths]
    metric = passthrough_metric()
    metric.update(perfect, truths, torch.ones(len(truths), dtype=torch.bool))
    present = {CLASSES[label] for t in truths for label in t["labels"].tolist()}
    assert metric.compute() == pytest.approx(
        {"map_50": 1.0, "map": 1.0, "recall": 1.0, **{f"ap_50/{name}": 1.0 for name in present}}
    )
    metric.reset()
    metric.update(perfect[:1], truths[:1], torch.ones(1, dtype=torch.bool))
    metric.update([{k: v[:0] for k, v in perfect[1].items()}], truths[1:2], torch.ones(1, dtype=torch.bool))
    assert metric.compute()["recall"] < 1.0


def test_task_metric_decodes_raw_outputs_with_its_evaluation_threshold() -> None:
    task = Detection("det", 2, class_names=["a", "b"], metric_score_threshold=0.05)
    points = torch.tensor([[20.0, 20.0], [40.0, 40.0]])
    raw = {
        "cls_logits": torch.tensor([[[4.0, -9.0], [-9.0, -3.0]]]),
        "box_distances": torch.tensor([[[10.0, 10.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]]]),
        "centerness": torch.tensor([[5.0, 5.0]]),
        "points": points,
        "strides": torch.tensor([8.0, 8.0]),
        "image_size": (64, 64),
    }
    truth = [
        {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [35.0, 35.0, 45.0, 45.0]]), "labels": torch.tensor([0, 1])}
    ]
    metric = task.metric()
    metric.update(raw, truth, torch.tensor([True]))
    # class b's score sqrt(sigmoid(-3) * sigmoid(5)) ~ 0.22: below decode's 0.3, above the metric's 0.05.
    assert len(task.decode(raw)[0]["boxes"]) == 1
    assert metric.compute()["map_50"] == pytest.approx(1.0)
    assert set(metric.per_class()) == {"a", "b"}
