"""The keypoints task: settings, targets, CenterNet decoding of ideal maps, the loss, and the metric against
pycocotools' COCOeval(iouType="keypoints") on decoded predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS, Keypoints, TargetKind
from mtlvision.tasks.keypoint_head import KeypointHead
from mtlvision.tasks.keypoint_metric import COCO_SIGMAS, ImageKeypoints
from mtlvision.tasks.keypoint_targets import as_logits, encode_targets, gaussian_radius
from mtlvision.tasks.keypoints import COCO_KEYPOINT_NAMES

NAMES = ["top", "right", "bottom", "left"]


def _task(**settings: object) -> Keypoints:
    defaults: dict[str, object] = {"flip_pairs": [("right", "left")], "sigmas": [0.1] * 4}
    return Keypoints("kp", NAMES, **{**defaults, **settings})


def _instances(rng: np.random.Generator, size: int, stride: int) -> dict[str, torch.Tensor]:
    """Instances on a coarse grid (so that no two share a heatmap peak), keypoints in distinct cells."""
    slots = [(x, y) for x in range(0, size - 23, 24) for y in range(0, size - 23, 24)]
    chosen = rng.permutation(len(slots))[: int(rng.integers(1, len(slots) + 1))]
    boxes, keypoints = [], []
    for slot in chosen:
        x0, y0 = slots[slot]
        while True:
            left, top = x0 + rng.uniform(0, 4), y0 + rng.uniform(0, 4)
            box = [left, top, left + rng.uniform(8, 19), top + rng.uniform(8, 19)]
            points = rng.uniform(box[:2], box[2:], (4, 2))
            cells = {tuple(c) for c in np.floor(points / stride).astype(int).tolist()}
            if len(cells) == 4:
                break
        visibility = rng.choice([1.0, 2.0], size=(4, 1))
        boxes.append(box)
        keypoints.append(np.concatenate([points, visibility], axis=1))
    return {
        "keypoints": torch.tensor(np.array(keypoints), dtype=torch.float32),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
    }


def _ideal(targets: list[dict[str, torch.Tensor]], stride: int, cells: int) -> dict[str, object]:
    """Head outputs that are exactly the encoded targets: heatmaps as logits, regressions at their cells."""
    encoded = encode_targets(targets, 4, stride, cells, cells, torch.device("cpu"))
    batch = len(targets)

    def at_cells(channels: int, index: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        maps = torch.zeros(batch, cells * cells, channels)
        for b in range(batch):
            keep = mask[b].reshape(-1)
            maps[b, index[b].reshape(-1)[keep]] = values[b].reshape(-1, channels)[keep]
        return maps.transpose(1, 2).reshape(batch, channels, cells, cells)

    instance = encoded.instance_mask
    return {
        "center": as_logits(encoded.center_heatmap),
        "keypoint_heatmaps": as_logits(encoded.keypoint_heatmaps),
        "center_offset": at_cells(2, encoded.center_index, encoded.center_offset, instance),
        "size": at_cells(2, encoded.center_index, encoded.size, instance),
        "joints": at_cells(8, encoded.center_index, encoded.joints.reshape(batch, -1, 8), instance),
        "keypoint_offset": at_cells(2, encoded.keypoint_index, encoded.keypoint_offset, encoded.keypoint_mask),
        "stride": stride,
        "image_size": (cells * stride, cells * stride),
    }


def test_registered_with_its_target_kind_and_metrics() -> None:
    task = _task()
    assert TASKS.get("keypoints") is Keypoints and task.target_kind is TargetKind.KEYPOINTS
    assert set(task.metric_directions) == {"ap", "ap50", "ap75"} and task.primary_metric == "ap"
    assert task.flip_permutation == [0, 3, 2, 1]
    rebuilt = Keypoints(**{k: v for k, v in task.describe().items() if k != "kind"})
    assert rebuilt.describe() == task.describe()


def test_coco_names_take_coco_sigmas_and_others_need_sigmas() -> None:
    assert Keypoints("person", list(COCO_KEYPOINT_NAMES)).sigmas == list(COCO_SIGMAS)
    with pytest.raises(ConfigError, match="sigmas"):
        Keypoints("kp", NAMES)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"flip_pairs": [("right", "elbow")]}, "flip_pairs names unknown keypoints"),
        ({"flip_pairs": [("right", "left"), ("left", "top")]}, "each at most once"),
        ({"sigmas": [0.1, 0.1]}, "sigmas must hold 4"),
        ({"sigmas": [0.1, 0.1, 0.0, 0.1]}, "sigmas must hold 4"),
        ({"skeleton": [("top", "nose")]}, "skeleton names unknown"),
        ({"max_instances": 0}, "tasks.kp.max_instances"),
        ({"colour": "red"}, "tasks.kp.colour"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _task(**settings)


def test_check_target_refuses_malformed_targets() -> None:
    task = _task()
    good = {"keypoints": torch.zeros(2, 4, 3), "boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 3, 5]])}
    task.check_target(good, "ok.json")
    with pytest.raises(DataError, match=r"bad\.json.*\[2, 4, 3\]"):
        task.check_target({**good, "keypoints": torch.zeros(2, 3, 3)}, "bad.json")
    wrong_v = good["keypoints"].clone()
    wrong_v[1, 2, 2] = 3
    with pytest.raises(DataError, match="visibility must be 0"):
        task.check_target({**good, "keypoints": wrong_v}, "bad.json")
    with pytest.raises(DataError, match="box 1"):
        task.check_target({**good, "boxes": torch.tensor([[0.0, 0, 4, 4], [3, 1, 3, 5]])}, "bad.json")


def test_gaussian_radius_is_positive_and_scales_with_the_box() -> None:
    # CornerNet's three cases are each homogeneous of degree one in the box's sides
    heights, widths = torch.tensor([3.0, 10.0, 40.0]), torch.tensor([5.0, 20.0, 7.0])
    radius = gaussian_radius(heights, widths)
    assert bool((radius > 0).all())
    torch.testing.assert_close(gaussian_radius(2 * heights, 2 * widths), 2 * radius)
    assert float(gaussian_radius(torch.tensor(10.0), torch.tensor(10.0))) < float(
        gaussian_radius(torch.tensor(10.0), torch.tensor(30.0))
    )


@pytest.mark.parametrize(("stride", "seed"), [(4, 0), (4, 1), (8, 2)])
def test_decoding_ideal_maps_recovers_every_instance_exactly(stride: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = [_instances(rng, 96, stride) for _ in range(2)]
    prediction = _ideal(targets, stride, 96 // stride)
    task = _task()
    for found, target in zip(task.detect(prediction, score_threshold=0.5), targets, strict=True):
        order = torch.argsort(found.boxes[:, 0] * 1000 + found.boxes[:, 1])
        truth_order = torch.argsort(target["boxes"][:, 0] * 1000 + target["boxes"][:, 1])
        assert len(order) == len(truth_order)
        torch.testing.assert_close(found.boxes[order], target["boxes"][truth_order], atol=1e-4, rtol=0)
        torch.testing.assert_close(found.keypoints[order], target["keypoints"][truth_order, :, :2], atol=1e-4, rtol=0)
        assert bool((found.keypoint_scores > 0.99).all())  # every keypoint snapped to its own heatmap peak


def test_the_loss_has_zero_regression_terms_at_the_ideal_maps_and_grows_away_from_them() -> None:
    rng = np.random.default_rng(3)
    targets = [_instances(rng, 64, 4) for _ in range(2)]
    ideal = _ideal(targets, 4, 16)
    task = _task()
    valid = torch.tensor([True, True])
    terms = task.loss_terms(ideal, targets, valid)
    for name in ("joints", "size", "center_offset", "keypoint_offset"):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 0.5 * torch.randn(v.shape, generator=generator) if torch.is_tensor(v) else v for k, v in ideal.items()
    }
    worse = task.loss_terms(noisy, targets, valid)
    for name, value in terms.items():
        assert worse[name] > value, name


def test_invalid_samples_cost_nothing() -> None:
    rng = np.random.default_rng(4)
    targets = [_instances(rng, 64, 4) for _ in range(2)]
    generator = torch.Generator().manual_seed(1)
    prediction = {
        k: torch.randn(v.shape, generator=generator) if torch.is_tensor(v) else v
        for k, v in _ideal(targets, 4, 16).items()
    }
    task = _task()
    both = task.loss(prediction, targets, torch.tensor([True, False]))
    first = task.loss(
        {k: v[:1] if torch.is_tensor(v) else v for k, v in prediction.items()}, targets[:1], torch.tensor([True])
    )
    torch.testing.assert_close(both, first)
    assert task.loss(prediction, targets, torch.tensor([False, False])).item() == 0.0


def test_a_few_optimisation_steps_on_one_batch_lower_the_loss() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    targets = [_instances(rng, 64, 4) for _ in range(2)]
    features = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)]
    head = KeypointHead([8, 16], [4, 8], num_keypoints=4, stride=4, width=16)
    task = _task()
    optimiser = torch.optim.Adam(head.parameters(), lr=2e-2)
    losses = []
    for _ in range(6):
        loss = task.loss(head(features, (64, 64)), targets, torch.tensor([True, True]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_metric_equals_pycocotools_on_decoded_noisy_predictions() -> None:
    pytest.importorskip("pycocotools")
    from tests.tasks.test_keypoint_metric import _pycocotools

    task = _task(max_instances=20)
    metric = task.metric()
    truths, detections = [], []
    for seed in range(3):
        rng = np.random.default_rng(10 + seed)
        targets = [_instances(rng, 96, 4) for _ in range(2)]
        ideal = _ideal(targets, 4, 24)
        generator = torch.Generator().manual_seed(seed)
        noisy = {
            k: v + 0.3 * torch.randn(v.shape, generator=generator) if torch.is_tensor(v) else v
            for k, v in ideal.items()
        }
        valid = torch.tensor([True, seed != 1])
        metric.update(noisy, targets, valid)
        for found, target, ok in zip(task.detect(noisy), targets, valid.tolist(), strict=True):
            if not ok:
                continue
            corners = target["boxes"].double().numpy()
            xywh = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
            truths.append(ImageKeypoints(target["keypoints"].double().numpy(), xywh, xywh[:, 2] * xywh[:, 3]))
            points = found.keypoints.double().numpy()
            detections.append(
                ImageKeypoints(
                    np.concatenate([points, np.ones((*points.shape[:2], 1))], axis=2),
                    scores=found.scores.double().numpy(),
                )
            )
    got = metric.compute()
    want = _pycocotools(truths, detections, [0.1] * 4)
    assert 0.0 < got["ap"] < 1.0
    for key in ("ap", "ap50", "ap75"):
        assert got[key] == pytest.approx(want[key], abs=1e-9)


def test_decode_and_draw_give_json_and_a_picture() -> None:
    rng = np.random.default_rng(6)
    targets = [_instances(rng, 64, 4)]
    task = _task(skeleton=[("top", "right"), ("left", "top")])
    (decoded,) = task.decode(_ideal(targets, 4, 16))
    assert decoded["keypoint_names"] == NAMES and len(decoded["boxes"]) == len(targets[0]["boxes"])
    assert all(len(points) == 4 and all(len(p) == 3 for p in points) for points in decoded["keypoints"])
    image = np.zeros((64, 64, 3), np.uint8)
    picture = task.draw(image, decoded)
    assert picture.shape == (64, 64, 3) and picture.any()


def test_data_checks_name_a_labelled_keypoint_outside_the_image() -> None:
    from mtlvision.data.problems import target_problems

    task = _task()
    keypoints = torch.tensor([[[2.0, 2.0, 2.0], [30.0, 3.0, 1.0], [0.0, 0.0, 0.0], [1.0, 5.0, 2.0]]])
    target = {"keypoints": keypoints, "boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]])}
    problems = target_problems(task, target, "a.json", (10, 10))
    assert [kind for kind, _ in problems] == ["point_outside"]
    assert "a.json" in problems[0][1] and "instance 0 keypoint 1" in problems[0][1]
    keypoints[0, 1, 2] = 0.0  # an unlabelled keypoint may lie anywhere
    assert (
        target_problems(task, {**target, "keypoints": keypoints * (keypoints[..., 2:] > 0)}, "a.json", (10, 10)) == []
    )
