"""Detection task: FCOS target assignment, loss, decoding with NMS, drawing and target checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import sigmoid_focal_loss

from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS
from mtlvision.tasks.detection import Detection, assign_batch, assign_targets, centerness_target, level_ranges
from mtlvision.tasks.detection_head import FCOSHead, location_grid


def grid(size: int, *strides: int) -> tuple[torch.Tensor, torch.Tensor]:
    points = [location_grid(size // s, size // s, s, torch.device("cpu")) for s in strides]
    point_strides = [torch.full((p.shape[0],), float(s)) for p, s in zip(points, strides)]
    return torch.cat(points), torch.cat(point_strides)


def positives_of(assigned: torch.Tensor, points: torch.Tensor, box: int) -> set[tuple[float, float]]:
    return {tuple(p) for p in points[assigned == box].tolist()}


# ------------------------------------------------------------------------------------------ assignment
def test_registered_with_the_contract_attributes() -> None:
    assert TASKS.get("detection") is Detection
    task = Detection("det", 3)
    assert task.primary_metric == "map_50" and set(task.metric_directions) == {"map_50", "map", "recall"}
    assert task.level == "dense" and task.target_kind.value == "boxes"
    assert task.score_threshold >= 0.05 and task.max_detections == 100


def test_location_grid_holds_cell_centres_row_major() -> None:
    points = location_grid(2, 3, 8, torch.device("cpu"))
    assert points.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def test_level_ranges_follow_fcos() -> None:
    strides = torch.tensor([8.0, 16.0, 32.0, 64.0, 128.0])
    lower, upper = level_ranges(strides, 8.0)
    assert lower.tolist() == [0, 64, 128, 256, 512]
    assert upper.tolist()[:4] == [64, 128, 256, 512] and math.isinf(upper[4])


def test_centre_sampling_keeps_locations_within_radius() -> None:
    points, strides = grid(64, 8)
    assigned = assign_targets(points, strides, torch.tensor([[0.0, 0.0, 32.0, 32.0]]))
    # centre (16, 16), radius 1.5 * 8 = 12: x and y in {12, 20} (4 and 28 lie exactly on the radius).
    assert positives_of(assigned, points, 0) == {(12, 12), (20, 12), (12, 20), (20, 20)}
    assert int((assigned == -1).sum()) == points.shape[0] - 4


def test_scale_ranges_send_boxes_to_their_level() -> None:
    points, strides = grid(64, 8, 16)
    boxes = torch.tensor([[40.0, 40.0, 56.0, 56.0], [0.0, 0.0, 48.0, 48.0]])
    assigned = assign_targets(points, strides, boxes, size_factor=2.0)  # stride 8: (0, 16], stride 16: (16, inf)
    assert set(strides[assigned == 0].tolist()) == {8.0}
    assert set(strides[assigned == 1].tolist()) == {16.0}
    assert (assigned == 0).any() and (assigned == 1).any()


def test_ambiguous_location_goes_to_the_smaller_box() -> None:
    points, strides = grid(64, 8)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [24.0, 24.0, 40.0, 40.0]])
    assigned = assign_targets(points, strides, boxes, center_radius=3.0)
    assert positives_of(assigned, points, 1) == {(28, 28), (36, 28), (28, 36), (36, 36)}
    assert not positives_of(assigned, points, 0) & positives_of(assigned, points, 1)
    assert (assigned == 0).any()


def test_tiny_box_between_centres_gets_the_nearest_location() -> None:
    points, strides = grid(64, 8)
    assigned = assign_targets(points, strides, torch.tensor([[13.0, 13.0, 15.0, 15.0]]))
    assert positives_of(assigned, points, 0) == {(12, 12)}


def test_no_boxes_means_all_background() -> None:
    points, strides = grid(32, 8, 16)
    assert (assign_targets(points, strides, torch.zeros((0, 4))) == -1).all()


@settings(max_examples=40, deadline=None)
@given(x1=st.floats(0, 60), y1=st.floats(0, 60), w=st.floats(0.5, 64), h=st.floats(0.5, 64))
def test_every_box_gets_a_location_inside_or_nearest(x1: float, y1: float, w: float, h: float) -> None:
    points, strides = grid(64, 8, 16, 32)
    box = torch.tensor([[x1, y1, min(x1 + w, 64.0), min(y1 + h, 64.0)]])
    assigned = assign_targets(points, strides, box)
    chosen = points[assigned == 0]
    assert chosen.shape[0] >= 1
    inside = (
        (chosen[:, 0] > box[0, 0])
        & (chosen[:, 0] < box[0, 2])
        & (chosen[:, 1] > box[0, 1])
        & (chosen[:, 1] < box[0, 3])
    )
    assert inside.all() or chosen.shape[0] == 1


def test_centerness_is_one_at_the_centre_and_matches_the_formula() -> None:
    values = centerness_target(torch.tensor([[5.0, 5.0, 5.0, 5.0], [2.0, 6.0, 8.0, 3.0]]))
    assert values[0] == pytest.approx(1.0)
    assert values[1] == pytest.approx(math.sqrt(2 / 8 * 3 / 6))


# ------------------------------------------------------------------------------------------------ loss
def raw_prediction(batch: int = 2, num_classes: int = 3, size: int = 32, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    points, strides = grid(size, 8, 16)
    count = points.shape[0]
    return {
        "cls_logits": torch.randn(batch, count, num_classes, generator=generator).requires_grad_(),
        "box_distances": (torch.rand(batch, count, 4, generator=generator) * 10 + 1).requires_grad_(),
        "centerness": torch.randn(batch, count, generator=generator).requires_grad_(),
        "points": points,
        "strides": strides,
        "image_size": (size, size),
    }


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[2.0, 2.0, 20.0, 18.0], [16.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[4.0, 4.0, 12.0, 12.0]]), "labels": torch.tensor([1])},
    ]


def test_invalid_images_contribute_nothing() -> None:
    task = Detection("det", 3)
    prediction = raw_prediction()
    full = task.loss(prediction, targets(), torch.tensor([True, False]))
    full.backward()
    for key in ("cls_logits", "box_distances", "centerness"):
        assert prediction[key].grad[1].abs().max() == 0
    other = targets()
    other[1] = {"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]), "labels": torch.tensor([2])}
    assert task.loss(prediction, other, torch.tensor([True, False])).item() == pytest.approx(full.item())
    alone = {k: (v[:1] if k in ("cls_logits", "box_distances", "centerness") else v) for k, v in prediction.items()}
    assert task.loss(alone, targets()[:1], torch.tensor([True])).item() == pytest.approx(full.item())


def test_no_valid_image_gives_zero_that_keeps_the_graph() -> None:
    task = Detection("det", 3)
    prediction = raw_prediction()
    loss = task.loss(prediction, targets(), torch.tensor([False, False]))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert prediction["cls_logits"].grad.abs().max() == 0


def test_image_without_boxes_is_all_negative_focal_loss() -> None:
    task = Detection("det", 3)
    prediction = raw_prediction(batch=1)
    empty = [task.placeholder_target(32, 32)]
    loss = task.loss(prediction, empty, torch.tensor([True]))
    logits = prediction["cls_logits"][0]
    expected = sigmoid_focal_loss(logits, torch.zeros_like(logits), reduction="sum")  # / max(0 positives, 1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_perfect_prediction_leaves_only_the_centerness_entropy() -> None:
    task = Detection("det", 3)
    prediction = raw_prediction(batch=1)
    target = targets()[:1]
    assigned = assign_targets(prediction["points"], prediction["strides"], target[0]["boxes"])
    positive = assigned >= 0
    boxes = target[0]["boxes"][assigned.clamp_min(0)]
    points = prediction["points"]
    distances = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], dim=1)
    centerness = centerness_target(distances).clamp(1e-4, 1 - 1e-4)
    logits = torch.full((points.shape[0], 3), -30.0)
    logits[positive, target[0]["labels"][assigned[positive]]] = 30.0
    perfect = dict(prediction)
    perfect.update(
        cls_logits=logits[None],
        box_distances=torch.where(positive[:, None], distances, torch.ones_like(distances))[None],
        centerness=torch.log(centerness / (1 - centerness))[None],
    )
    c = centerness[positive].double().numpy()
    entropy = float(-(c * np.log(c) + (1 - c) * np.log(1 - c)).sum() / positive.sum().item())
    assert task.loss(perfect, target, torch.tensor([True])).item() == pytest.approx(entropy, rel=1e-4, abs=1e-5)


def test_collate_keeps_variable_length_targets() -> None:
    task = Detection("det", 3)
    batch = task.collate(targets())
    assert isinstance(batch, list) and [len(t["labels"]) for t in batch] == [2, 1]


# -------------------------------------------------------------------------------------------- decoding
def hand_made_raw(num_classes: int = 2) -> dict:
    points = torch.tensor([[10.0, 10.0], [12.0, 10.0], [10.0, 12.0], [40.0, 40.0], [50.0, 50.0]])
    logits = torch.full((1, 5, num_classes), -10.0)
    logits[0, 0, 0] = 3.0  # box A, class 0
    logits[0, 1, 0] = 2.0  # nearly the same box, class 0, lower score -> suppressed
    logits[0, 2, 1] = 2.5  # nearly the same box, class 1 -> kept (NMS per class)
    logits[0, 3, 1] = -4.0  # score sqrt(0.018) below the threshold
    logits[0, 4, 0] = 4.0  # runs past the image border -> clipped
    distances = torch.tensor(
        [[5.0, 5.0, 5.0, 5.0], [7.0, 5.0, 3.0, 5.0], [5.0, 7.0, 5.0, 3.0], [5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 30.0, 30.0]]
    )
    return {
        "cls_logits": logits,
        "box_distances": distances[None],
        "centerness": torch.full((1, 5), 10.0),
        "points": points,
        "strides": torch.full((5,), 8.0),
        "image_size": (60, 64),
    }


def test_decode_thresholds_suppresses_per_class_and_clips() -> None:
    task = Detection("det", 2, class_names=["cat", "dog"], score_threshold=0.3, nms_iou=0.5)
    decoded = task.decode(hand_made_raw())
    assert len(decoded) == 1
    result = decoded[0]
    json.dumps(result)
    assert result["labels"] == [0, 0, 1]
    assert result["class_names"] == ["cat", "cat", "dog"]
    assert result["boxes"] == [[45.0, 45.0, 64.0, 60.0], [5.0, 5.0, 15.0, 15.0], [5.0, 5.0, 15.0, 15.0]]
    expected = [
        math.sqrt(torch.sigmoid(torch.tensor(v)).item() * torch.sigmoid(torch.tensor(10.0)).item())
        for v in (4.0, 3.0, 2.5)
    ]
    assert result["scores"] == pytest.approx(expected, abs=1e-4)


def test_decode_offers_each_location_once_and_the_metric_every_class() -> None:
    """An object the classifier is unsure about: decode returns its box once, under the best class; the
    metrics (FCOS's evaluation) see one candidate per class above the threshold."""
    raw = hand_made_raw()
    raw["cls_logits"][0, 0, 1] = 2.8  # location 0 also says "dog", a little less sure than "cat" (3.0)
    task = Detection("det", 2, class_names=["cat", "dog"], score_threshold=0.3, nms_iou=0.5)
    decoded = task.decode(raw)[0]
    assert decoded["boxes"].count([5.0, 5.0, 15.0, 15.0]) == 2  # location 0 as cat, location 2 as dog
    at_location_0 = [
        label for box, label in zip(decoded["boxes"], decoded["labels"], strict=True) if box == [5.0, 5.0, 15.0, 15.0]
    ]
    assert sorted(at_location_0) == [0, 1]
    every_class = task.detect(raw, multi_label=True)[0]
    # Here both give three boxes: location 0's "dog" and location 2's "dog" share one box, so NMS keeps one.
    assert len(every_class["labels"]) == len(decoded["labels"]) == 3
    raw["cls_logits"][0, 2, 1] = -10.0  # without location 2's dog the two modes differ:
    assert task.decode(raw)[0]["labels"] == [0, 0]
    assert sorted(task.detect(raw, multi_label=True)[0]["labels"].tolist()) == [0, 0, 1]
    assert Detection("det", 2, multi_label_decode=True).decode(raw)[0]["labels"].count(1) == 1


def test_max_detections_and_top_k_bound_the_output() -> None:
    task = Detection("det", 2, max_detections=2)
    assert len(task.detect(hand_made_raw())[0]["scores"]) == 2
    assert Detection("det", 2, pre_nms_top_k=1).detect(hand_made_raw())[0]["labels"].tolist() == [0]


def test_head_outputs_decode_end_to_end() -> None:
    task = Detection("det", 4, strides=(8, 16))
    head = task.build_custom_head([8, 16, 32], [4, 8, 16])
    features = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]
    raw = task.postprocess(head(features, (64, 64)))
    assert raw["cls_logits"].shape == (2, 64 + 16, 4) and raw["box_distances"].min() > 0
    for found in task.detect(raw, score_threshold=0.0):
        boxes = found["boxes"]
        assert len(boxes) <= task.max_detections
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 64).all() and (boxes[:, 2] >= boxes[:, 0]).all()
    # the focal-loss prior: nothing passes the default threshold before training
    assert all(len(d["boxes"]) == 0 for d in task.decode(raw))


def test_head_rejects_strides_the_backbone_lacks() -> None:
    with pytest.raises(ConfigError, match="strides"):
        FCOSHead([8, 16], [4, 8], num_classes=2, strides=(8, 16))


def test_draw_outlines_each_box_in_its_class_colour() -> None:
    task = Detection("det", 2, class_names=["cat", "dog"])
    image = np.zeros((64, 64, 3), dtype=np.float32)
    decoded = {"boxes": [[10.0, 20.0, 40.0, 50.0]], "scores": [0.9], "labels": [1], "class_names": ["dog"]}
    picture = task.draw(image, decoded)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
    assert picture[35, 10].any() and picture[50, 25].any()  # left and bottom edges
    assert not picture[35, 25].any()  # inside stays untouched


# -------------------------------------------------------------------------------------- target checks
@pytest.mark.parametrize(
    ("boxes", "labels", "message"),
    [
        ([[1.0, 1.0, float("nan"), 5.0]], [0], "not finite"),
        ([[5.0, 1.0, 5.0, 9.0]], [0], "empty"),
        ([[-1.0, 1.0, 5.0, 9.0]], [0], "outside"),
        ([[1.0, 1.0, 70.0, 9.0]], [0], "outside the 64x64"),
        ([[1.0, 1.0, 5.0, 9.0]], [3], "label 3"),
    ],
)
def test_check_target_names_the_sample(boxes: list, labels: list, message: str) -> None:
    task = Detection("det", 3)
    target = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}
    with pytest.raises(DataError, match=message) as error:
        task.check_target(target, "train/17", image_size=(64, 64))
    assert "train/17" in str(error.value)


def test_check_target_accepts_good_and_empty_targets() -> None:
    task = Detection("det", 3)
    task.check_target(targets()[0], "s", image_size=(32, 32))
    task.check_target(task.placeholder_target(32, 32), "s")


def test_bad_configuration_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="class_names"):
        Detection("det", 3, class_names=["a"])
    with pytest.raises(ConfigError, match="nms_iou"):
        Detection("det", 3, nms_iou=1.5)


def test_default_levels_are_strides_4_to_32() -> None:
    task = Detection("det", 2)
    head = task.build_custom_head([64, 64, 128, 256, 512], [2, 4, 8, 16, 32])
    assert head.strides == [4, 8, 16, 32]
    assert Detection("det", 2, strides=[16, 8]).build_custom_head([8, 16, 32], [4, 8, 16]).strides == [8, 16]


def test_batched_assignment_equals_per_image_assignment() -> None:
    points, strides = grid(64, 4, 8, 16)
    generator = torch.Generator().manual_seed(3)
    images = []
    for count in (3, 0, 5, 1):
        corners = torch.rand(count, 2, generator=generator) * 50
        sizes = torch.rand(count, 2, generator=generator) * 30 + 1
        images.append(torch.cat([corners, (corners + sizes).clamp(max=64)], dim=1))
    padded = torch.zeros(4, 5, 4)
    box_valid = torch.zeros(4, 5, dtype=torch.bool)
    for row, boxes in enumerate(images):
        padded[row, : len(boxes)] = boxes
        box_valid[row, : len(boxes)] = True
    batched = assign_batch(points, strides, padded, box_valid)
    for row, boxes in enumerate(images):
        assert torch.equal(batched[row], assign_targets(points, strides, boxes))
    assert (batched[1] == -1).all()
