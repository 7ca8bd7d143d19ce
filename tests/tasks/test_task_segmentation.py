"""Semantic segmentation: loss over labelled pixels, mIoU from a split-level confusion matrix, decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix

from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import Segmentation

IGNORE = 255


def test_loss_is_per_sample_mean_over_labelled_pixels() -> None:
    task = Segmentation("seg", 3)
    logits = torch.randn(3, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (3, 4, 4))
    target[0, :2] = IGNORE  # half of sample 0 unlabelled
    target[2] = 77  # garbage in an unlabelled sample
    valid = torch.tensor([True, True, False])
    loss = task.loss(logits, target, valid)
    per_sample = [F.cross_entropy(logits[i : i + 1], target[i : i + 1], ignore_index=IGNORE) for i in range(2)]
    assert torch.allclose(loss, torch.stack(per_sample).mean())
    loss.backward()
    assert torch.all(logits.grad[2] == 0)  # the unlabelled sample
    assert torch.all(logits.grad[0, :, :2] == 0)  # the ignored pixels
    assert torch.all(logits.grad[0, :, 2:].abs().sum(dim=0) > 0)


def test_sample_without_labelled_pixels_does_not_dilute_the_loss() -> None:
    task = Segmentation("seg", 2)
    logits = torch.randn(2, 2, 3, 3)
    target = torch.randint(0, 2, (2, 3, 3))
    target[1] = IGNORE
    loss = task.loss(logits, target, torch.ones(2, dtype=torch.bool))
    assert torch.allclose(loss, F.cross_entropy(logits[:1], target[:1]))


def test_perfect_prediction_and_resolution_mismatch() -> None:
    task = Segmentation("seg", 4)
    target = torch.randint(0, 4, (2, 5, 5))
    logits = 50.0 * F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    assert task.loss(logits, target, torch.ones(2, dtype=torch.bool)).item() < 1e-6
    with pytest.raises(ValueError, match="resolution"):
        task.loss(torch.randn(2, 4, 4, 4), target, torch.ones(2, dtype=torch.bool))


def _random_batches(seed: int, num_classes: int, sizes: list[int], absent: int | None) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        height, width = 5, 6
        target = torch.randint(0, num_classes, (size, height, width), generator=generator)
        target[torch.rand(size, height, width, generator=generator) < 0.15] = IGNORE
        logits = 2.0 * F.one_hot(target.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
        logits = logits + 1.5 * torch.randn(size, num_classes, height, width, generator=generator)
        if absent is not None:  # a class in neither the targets nor the predictions
            target[target == absent] = IGNORE
            logits[:, absent] = -100.0
        valid = torch.rand(size, generator=generator) < 0.8
        batches.append((logits, target, valid))
    return batches


def _reference(batches: list[tuple], num_classes: int) -> dict[str, float]:
    predicted = np.concatenate([b[0][b[2]].argmax(1).numpy().ravel() for b in batches])
    truth = np.concatenate([b[1][b[2]].numpy().ravel() for b in batches])
    labelled = truth != IGNORE
    matrix = confusion_matrix(truth[labelled], predicted[labelled], labels=list(range(num_classes))).astype(float)
    hits = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - hits
    return {"miou": float(np.mean(hits[union > 0] / union[union > 0])), "pixel_accuracy": hits.sum() / matrix.sum()}


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_classes=st.integers(2, 6),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    with_absent=st.booleans(),
)
def test_metrics_match_a_split_level_confusion_matrix(
    seed: int, num_classes: int, sizes: list[int], with_absent: bool
) -> None:
    absent = num_classes - 1 if with_absent and num_classes > 2 else None
    batches = _random_batches(seed, num_classes, sizes, absent)
    batches[0][2][0] = True
    metric = Segmentation("seg", num_classes).metric()
    for batch in batches:
        metric.update(*batch)
    result = metric.compute()
    expected = _reference(batches, num_classes)
    assert set(result) == {"miou", "pixel_accuracy"}
    assert result["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-9)


def test_miou_is_not_a_mean_of_batch_mious() -> None:
    task = Segmentation("seg", 2)
    metric = task.metric()
    # batch 1: one pixel of class 0, predicted right; batch 2: 8 pixels of class 1, half predicted 0.
    metric.update(torch.tensor([[[[1.0]], [[0.0]]]]), torch.tensor([[[0]]]), torch.tensor([True]))
    logits = torch.zeros(1, 2, 2, 4)
    logits[0, 0, 0] = 1.0
    logits[0, 1, 1] = 1.0
    metric.update(logits, torch.ones(1, 2, 4, dtype=torch.int64), torch.tensor([True]))
    result = metric.compute()
    # class 0: TP 1, FP 4 -> 1/5; class 1: TP 4, FN 4 -> 1/2
    assert result["miou"] == pytest.approx((1 / 5 + 1 / 2) / 2)
    assert result["pixel_accuracy"] == pytest.approx(5 / 9)


def test_custom_ignore_index_and_empty_split() -> None:
    task = Segmentation("seg", 3, ignore_index=-1)
    target = torch.full((1, 2, 2), -1)
    target[0, 0, 0] = 2
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2] = 1.0
    metric = task.metric()
    metric.update(logits, target, torch.tensor([True]))
    assert metric.compute() == {"miou": 1.0, "pixel_accuracy": 1.0}
    empty = task.metric()
    empty.update(logits, target, torch.tensor([False]))
    assert all(math.isnan(v) for v in empty.compute().values())


def test_decode_and_draw() -> None:
    task = Segmentation("seg", 3, class_names=["sky", "road", "car"])
    logits = torch.zeros(2, 3, 4, 5)
    logits[0, 2, :2] = 1.0
    logits[1, 1] = 1.0
    decoded = task.decode(logits)
    assert decoded[0]["mask"].shape == (4, 5) and decoded[0]["mask"].dtype == np.uint8
    assert decoded[0]["class_histogram"] == {"sky": 10, "car": 10}
    assert decoded[1]["class_histogram"] == {"road": 20}
    image = np.full((8, 10, 3), 200, dtype=np.uint8)
    picture = task.draw(image, decoded[0])
    assert picture.shape == (8, 10, 3) and picture.dtype == np.uint8
    assert not np.array_equal(picture[:4], picture[4:])  # car on top, sky below: different colours
    assert Segmentation("big", 300, ignore_index=-1).decode(torch.zeros(1, 300, 2, 2))[0]["mask"].dtype == np.uint16


def test_check_target_and_constructor() -> None:
    task = Segmentation("seg", 3)
    good = torch.tensor([[0, 1], [2, IGNORE]])
    task.check_target(good, "a.png")
    task.check_target(task.placeholder_target(3, 4), "a.png")
    assert task.placeholder_target(3, 4).shape == (3, 4)
    for bad in [torch.tensor([[0, 3]]), torch.tensor([[0, -1]]), good.to(torch.uint8), good[None], good.float()]:
        with pytest.raises(DataError, match="mask_7.png"):
            task.check_target(bad, "mask_7.png")
    with pytest.raises(ConfigError, match="ignore_index"):
        Segmentation("seg", 3, ignore_index=2)
    with pytest.raises(ConfigError, match="num_classes"):
        Segmentation("seg", 1)
    params = {k: v for k, v in task.describe().items() if k != "kind"}
    assert Segmentation(**params).describe() == task.describe()
