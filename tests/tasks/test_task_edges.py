"""Edges: the weighted BCE against numpy, odsF's one-to-one matching against an independent assignment on
random cases, the split metric against a hand count, checks, decoding and drawing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS, Edges
from mtlvision.tasks.edge_metric import boundary_counts, bsds_thresholds, match_count, ods_f


def _assignment_matches(predicted: np.ndarray, truth: np.ndarray, radius: float) -> int:
    """The largest one-to-one matching through the Hungarian method on a dense 0/1 cost (an independent
    algorithm): a minimum-cost complete assignment of the smaller side uses as many zero-cost pairs as any
    matching can."""
    p = np.argwhere(predicted).astype(np.float64)
    t = np.argwhere(truth).astype(np.float64)
    if len(p) == 0 or len(t) == 0:
        return 0
    distance = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    cost = (distance > radius).astype(np.float64)
    rows, cols = linear_sum_assignment(cost)
    return int((cost[rows, cols] == 0).sum())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    radius=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 2.9]),
)
def test_matching_equals_an_independent_assignment_on_random_maps(seed, height, width, radius) -> None:
    rng = np.random.default_rng(seed)
    predicted = rng.random((height, width)) < rng.uniform(0.05, 0.6)
    truth = rng.random((height, width)) < rng.uniform(0.05, 0.6)
    assert match_count(predicted, truth, radius) == _assignment_matches(predicted, truth, radius)


def test_matching_is_one_to_one_and_respects_the_radius() -> None:
    truth = np.zeros((5, 9), bool)
    truth[2, 4] = True
    predicted = np.zeros((5, 9), bool)
    predicted[2, 3] = predicted[2, 5] = True  # two candidates for one true pixel: one match
    assert match_count(predicted, truth, 1.0) == 1
    assert match_count(predicted, truth, 0.99) == 0
    predicted[:] = False
    predicted[3, 5] = True  # diagonal neighbour: sqrt(2) away
    assert match_count(predicted, truth, 1.4) == 0 and match_count(predicted, truth, 1.5) == 1


def test_sub_pixel_counts_equal_the_general_matching() -> None:
    rng = np.random.default_rng(3)
    probability = rng.random((10, 11))
    truth = rng.random((10, 11)) < 0.2
    labelled = rng.random((10, 11)) < 0.9
    thresholds = bsds_thresholds(9)
    tolerance = 0.5 / math.hypot(10, 11)  # half a pixel: the fast path
    matches, predicted, total = boundary_counts(probability, truth, labelled, thresholds, tolerance)
    assert total == int((truth & labelled).sum())
    for i, level in enumerate(thresholds):
        edges = (probability >= level) & labelled
        assert predicted[i] == edges.sum()
        assert matches[i] == match_count(edges, truth & labelled, 0.0)


def test_ods_f_takes_the_best_threshold_over_summed_counts() -> None:
    matches = np.array([4, 3, 0])
    predicted = np.array([10, 4, 0])
    got = ods_f(matches, predicted, 6.0)
    f = [2 * (m / p) * (m / 6) / (m / p + m / 6) for m, p in ((4, 10), (3, 4))]
    assert got == pytest.approx(max(f))
    assert ods_f(np.zeros(2), np.zeros(2), 5.0) == 0.0  # nothing predicted: P = R = 0, F = 0 as BSDS


def test_the_split_metric_sums_counts_over_images_and_skips_invalid_samples() -> None:
    task = Edges("e", tolerance=1.5 / math.hypot(6, 7), thresholds=5)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 6, 7, generator=generator)
    target = (torch.rand(3, 6, 7, generator=generator) < 0.25).long()
    target[0, 0, :] = 255
    valid = torch.tensor([True, False, True])
    metric = task.metric()
    metric.update(logits[:2], target[:2], valid[:2])
    metric.update(logits[2:], target[2:], valid[2:])
    levels = bsds_thresholds(5)
    matches, predicted, total = np.zeros(5), np.zeros(5), 0.0
    for i in (0, 2):
        probability = torch.sigmoid(logits[i, 0]).numpy()
        labels = target[i].numpy()
        for k, level in enumerate(levels):
            edges = (probability >= level) & (labels != 255)
            predicted[k] += edges.sum()
            matches[k] += _assignment_matches(edges, labels == 1, 1.5)
        total += (labels == 1).sum()
    assert metric.compute()["odsF"] == pytest.approx(ods_f(matches, predicted, total))
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute()["odsF"])


def test_a_perfect_prediction_scores_one() -> None:
    target = torch.zeros(2, 8, 8, dtype=torch.int64)
    target[:, 3, 1:7] = 1
    logits = torch.where(target[:, None] == 1, 10.0, -10.0)
    metric = Edges("e").metric()
    metric.update(logits, target, torch.tensor([True, True]))
    assert metric.compute()["odsF"] == pytest.approx(1.0)


def test_loss_is_the_weighted_bce_over_labelled_pixels_of_valid_samples() -> None:
    task = Edges("e", pos_weight=0.8)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 4, 5, generator=generator, requires_grad=True)
    target = (torch.rand(3, 4, 5, generator=generator) < 0.3).long()
    target[0, :2] = 255
    valid = torch.tensor([True, True, False])
    loss = task.loss(logits, target, valid)
    x = logits.detach().numpy()[:, 0].astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    y = target.numpy()
    per_pixel = -(0.8 * (y == 1) * np.log(p) + 0.2 * (y == 0) * np.log(1 - p))
    want = np.mean([per_pixel[i][y[i] != 255].mean() for i in (0, 1)])
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert logits.grad is not None and float(logits.grad[2].abs().sum()) == 0.0  # the invalid sample
    assert float(logits.grad[0, 0, :2].abs().sum()) == 0.0  # its unlabelled rows


def test_parameters_and_targets_are_checked() -> None:
    for bad in ({"pos_weight": 1.0}, {"pos_weight": 0}, {"tolerance": -0.1}, {"thresholds": 0}, {"ignore_index": 1}):
        with pytest.raises(ConfigError, match="Task 'e'"):
            Edges("e", **bad)
    task = Edges("e")
    task.check_target(torch.tensor([[0, 1], [255, 1]]), "x.png")
    with pytest.raises(DataError, match=r"x\.png.*values \[2\]"):
        task.check_target(torch.tensor([[0, 2]]), "x.png")
    with pytest.raises(DataError, match="int64"):
        task.check_target(torch.zeros(1, 2, 2), "x.png")


def test_decode_and_draw() -> None:
    assert TASKS.get("edges") is Edges
    logits = torch.full((1, 1, 4, 4), -20.0)
    logits[0, 0, 1, :] = 20.0
    (decoded,) = Edges("e").decode(logits)
    assert decoded["edge_pixels"] == 4 and decoded["edges"].dtype == np.uint8
    np.testing.assert_array_equal(decoded["edges"][1], [1, 1, 1, 1])
    picture = Edges("e").draw(np.full((4, 4, 3), 100, np.uint8), decoded)
    assert picture.shape == (4, 4, 3)
    assert tuple(picture[0, 0]) == (100, 100, 100)  # no edge: the image
    assert tuple(picture[1, 3]) == (255, 32, 32)  # a certain edge: the edge colour
