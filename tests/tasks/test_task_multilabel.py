"""Multi-label classification: masked BCE, split-level metrics against scikit-learn, decoding, checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, average_precision_score, precision_recall_fscore_support

from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import MultiLabel


def test_loss_is_bce_over_valid_samples_only() -> None:
    task = MultiLabel("colours", 4)
    logits = torch.randn(5, 4, requires_grad=True)
    target = (torch.rand(5, 4) > 0.5).float()
    target[3:] = float("nan")  # unlabelled samples may hold anything
    valid = torch.tensor([True, True, True, False, False])
    loss = task.loss(logits, target, valid)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits[:3], target[:3]))
    loss.backward()
    assert torch.all(logits.grad[3:] == 0) and torch.isfinite(logits.grad).all()


def test_perfect_prediction_costs_nothing() -> None:
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    logits = 40.0 * (2 * target - 1)
    assert MultiLabel("m", 3).loss(logits, target, torch.ones(2, dtype=torch.bool)).item() < 1e-6


def _random_batches(seed: int, num_labels: int, sizes: list[int]) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        target = (torch.rand(size, num_labels, generator=generator) < 0.4).float()
        target[:, -1] = 0.0  # a label without positives: left out of mAP
        logits = 2.0 * (target - 0.5) + 1.5 * torch.randn(size, num_labels, generator=generator)
        valid = torch.rand(size, generator=generator) < 0.8
        batches.append((logits, target, valid))
    return batches


def _reference(batches: list[tuple], threshold: float) -> dict[str, float]:
    scores = np.concatenate([torch.sigmoid(b[0][b[2]]).numpy() for b in batches])
    truth = np.concatenate([b[1][b[2]].numpy() for b in batches]).astype(int)
    predicted = (scores > threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
    positive = truth.sum(axis=0) > 0
    aps = [average_precision_score(truth[:, i], scores[:, i]) for i in np.flatnonzero(positive)]
    return {
        "accuracy": float((predicted == truth).mean()),
        "exact_match": accuracy_score(truth, predicted),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "map": float(np.mean(aps)) if aps else float("nan"),
    }


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_labels=st.integers(2, 6),
    sizes=st.lists(st.integers(1, 10), min_size=1, max_size=4),
    threshold=st.sampled_from([0.3, 0.5, 0.7]),
)
def test_metrics_match_sklearn_over_the_whole_split(
    seed: int, num_labels: int, sizes: list[int], threshold: float
) -> None:
    batches = _random_batches(seed, num_labels, sizes)
    batches[0][2][0] = True
    metric = MultiLabel("m", num_labels, threshold=threshold).metric()
    for batch in batches:
        metric.update(*batch)
    result = metric.compute()
    expected = _reference(batches, threshold)
    assert set(result) == set(MultiLabel.metric_directions)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(result[key]), key
        else:
            assert result[key] == pytest.approx(value, abs=1e-5), key


def test_map_ignores_labels_without_positives() -> None:
    metric = MultiLabel("m", 3).metric()
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    logits = torch.tensor([[2.0, -2.0, 1.0], [-2.0, 2.0, 3.0], [2.0, 2.0, 0.0]])
    metric.update(logits, target, torch.ones(3, dtype=torch.bool))
    assert metric.compute()["map"] == pytest.approx(1.0)  # both labelled labels are ranked perfectly


def test_decode_uses_the_threshold_and_names() -> None:
    task = MultiLabel("colours", 3, label_names=["red", "green", "blue"], threshold=0.6)
    logits = torch.logit(torch.tensor([[0.9, 0.55, 0.1]]))
    (decoded,) = task.decode(logits)
    assert decoded["labels"] == ["red"]
    assert decoded["scores"]["green"] == pytest.approx(0.55, abs=1e-6)
    picture = task.draw(np.zeros((40, 40, 3), np.uint8), decoded)
    assert picture.shape == (40, 40, 3) and picture.dtype == np.uint8 and picture.any()


def test_check_target_and_constructor() -> None:
    task = MultiLabel("colours", 3)
    task.check_target(torch.tensor([1.0, 0.0, 1.0]), "img_1.png")
    task.check_target(task.placeholder_target(4, 4), "img_1.png")
    for bad in [torch.tensor([1.0, 0.5, 0.0]), torch.tensor([1, 0, 1]), torch.ones(4), [1.0, 0.0, 1.0]]:
        with pytest.raises(DataError, match="img_9.png"):
            task.check_target(bad, "img_9.png")
    with pytest.raises(ConfigError, match="num_labels"):
        MultiLabel("m", 1)
    with pytest.raises(ConfigError, match="threshold"):
        MultiLabel("m", 3, threshold=1.5)
    with pytest.raises(ConfigError, match="label_names"):
        MultiLabel("m", 2, label_names=["a", "a"])
    params = {k: v for k, v in MultiLabel("m", 2, ["a", "b"], 0.4).describe().items() if k != "kind"}
    assert MultiLabel(**params).threshold == 0.4
