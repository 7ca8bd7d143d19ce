"""Keypoint AP from OKS equals pycocotools' COCOeval(iouType="keypoints") on random cases."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlvision.tasks.keypoint_metric import COCO_SIGMAS, ImageKeypoints, keypoint_ap, oks

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


def _random_case(seed: int, images: int, joints: int) -> tuple[list[ImageKeypoints], list[ImageKeypoints]]:
    rng = np.random.default_rng(seed)
    truths, detections = [], []
    for _ in range(images):
        count = int(rng.integers(0, 4))
        centres = rng.uniform(20, 180, (count, 1, 2))
        points = centres + rng.normal(0, 12, (count, joints, 2))
        visibility = rng.choice([0, 1, 2], size=(count, joints, 1), p=[0.3, 0.2, 0.5]).astype(np.float64)
        visibility[rng.random(count) < 0.15] = 0  # some instances without any labelled keypoint
        keypoints = np.concatenate([points, visibility], axis=2)
        low, high = points.min(axis=1) - 5, points.max(axis=1) + 5
        boxes = np.concatenate([low, high - low], axis=1) if count else np.zeros((0, 4))
        areas = (high - low).prod(axis=1) * rng.uniform(0.4, 0.9, count) if count else np.zeros(0)
        truths.append(ImageKeypoints(keypoints, boxes, areas))
        found = int(rng.integers(0, count + 3))  # hits on instances, plus false detections
        source = rng.integers(0, max(count, 1), found)
        noise = rng.choice([0.3, 1.5, 5.0], size=(found, 1, 1))
        guesses = (
            points[source] + rng.normal(0, 1, (found, joints, 2)) * noise
            if count
            else rng.uniform(0, 200, (found, joints, 2))
        )
        wild = rng.random(found) < 0.25
        guesses[wild] = rng.uniform(0, 200, (int(wild.sum()), joints, 2))
        detected = np.concatenate([guesses, np.ones((found, joints, 1))], axis=2)
        detections.append(ImageKeypoints(detected, scores=rng.random(found)))
    return truths, detections


def _pycocotools(truths, detections, sigmas) -> dict[str, float]:
    joints = len(sigmas)
    images, annotations, results = [], [], []
    for image_id, (truth, detected) in enumerate(zip(truths, detections, strict=True), start=1):
        images.append({"id": image_id, "width": 200, "height": 200})
        for keypoints, box, area in zip(truth.keypoints, truth.boxes, truth.areas, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": box.tolist(),
                    "area": float(area),
                    "keypoints": keypoints.reshape(-1).tolist(),
                    "num_keypoints": int((keypoints[:, 2] > 0).sum()),
                }
            )
        for keypoints, score in zip(detected.keypoints, detected.scores, strict=True):
            results.append(
                {"image_id": image_id, "category_id": 1, "keypoints": keypoints.reshape(-1).tolist(), "score": score}
            )
    names = [f"k{i}" for i in range(joints)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "keypoints": names, "skeleton": []}],
        }
        gt.createIndex()
        if not results:
            return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
        dt = gt.loadRes(results)
        evaluation = COCOeval(gt, dt, iouType="keypoints")
        evaluation.params.kpt_oks_sigmas = np.asarray(sigmas)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"ap": stats[0], "ap50": stats[1], "ap75": stats[2]}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), images=st.integers(1, 5), coco=st.booleans())
def test_keypoint_ap_equals_pycocotools(seed: int, images: int, coco: bool) -> None:
    sigmas = COCO_SIGMAS if coco else tuple(np.random.default_rng(seed).uniform(0.02, 0.12, 5))
    truths, detections = _random_case(seed, images, len(sigmas))
    got = keypoint_ap(truths, detections, sigmas)
    want = _pycocotools(truths, detections, sigmas)
    scored = sum(int(((t.keypoints[:, :, 2] > 0).sum(1) > 0).sum()) for t in truths)
    for key in ("ap", "ap50", "ap75"):
        if scored == 0:
            assert math.isnan(got[key]) and want[key] in (-1.0, 0.0)
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_oks_is_one_on_the_spot_and_falls_with_distance() -> None:
    keypoints = np.array([[[10.0, 10.0, 2.0], [20.0, 10.0, 2.0], [0.0, 0.0, 0.0]]])
    truth = ImageKeypoints(keypoints, np.array([[5.0, 5.0, 20.0, 10.0]]), np.array([200.0]))
    sigmas = np.array([0.05, 0.05, 0.05])
    assert oks(keypoints, truth, sigmas)[0, 0] == pytest.approx(1.0)  # the unlabelled joint does not count
    moved = keypoints.copy()
    moved[0, 0, 0] += 3.0
    expected = (math.exp(-9.0 / (0.1**2) / 200.0 / 2) + 1.0) / 2
    assert oks(moved, truth, sigmas)[0, 0] == pytest.approx(expected)
