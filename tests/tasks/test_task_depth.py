"""Depth: losses over valid pixels, pixel-weighted split metrics against numpy, decoding and checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import Depth
from mtlvision.tasks.depth import DEPTH_LOSSES


def _depth_batch(seed: int, size: int, height: int = 4, width: int = 5) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    target = 0.5 + 5.0 * torch.rand(size, 1, height, width, generator=generator)
    target[torch.rand(size, 1, height, width, generator=generator) < 0.3] = 0.0  # no measurement
    prediction = target + 0.5 * torch.randn(size, 1, height, width, generator=generator)
    valid = torch.rand(size, generator=generator) < 0.8
    return prediction, target, valid


def _numpy_per_pixel(name: str, residual: np.ndarray, largest: float) -> np.ndarray:
    if name == "l1":
        return np.abs(residual)
    if name == "l2":
        return residual**2
    c = 0.2 * largest
    return np.where(np.abs(residual) <= c, np.abs(residual), (residual**2 + c**2) / (2 * c))


@pytest.mark.parametrize("name", sorted(DEPTH_LOSSES))
def test_loss_matches_numpy_and_ignores_invalid_pixels_and_samples(name: str) -> None:
    prediction, target, _ = _depth_batch(0, 3)
    prediction.requires_grad_(True)
    valid = torch.tensor([True, True, False])
    loss = Depth("d", loss=name).loss(prediction, target, valid)

    pred, truth = prediction.detach().numpy(), target.numpy()
    mask = (truth > 0) & valid.numpy()[:, None, None, None]
    residual = pred - truth
    per_pixel = _numpy_per_pixel(name, residual, float(np.abs(residual[mask]).max()))
    per_sample = [per_pixel[i][mask[i]].mean() for i in range(2)]
    assert loss.item() == pytest.approx(float(np.mean(per_sample)), rel=1e-5)

    loss.backward()
    gradient = prediction.grad.numpy()
    assert np.all(gradient[~mask] == 0)
    assert np.all(gradient[mask & (residual != 0)] != 0)


@pytest.mark.parametrize("name", sorted(DEPTH_LOSSES))
def test_perfect_prediction_costs_nothing(name: str) -> None:
    _, target, _ = _depth_batch(1, 2)
    prediction = target.clone().requires_grad_(True)
    prediction.data[target == 0] = 123.0  # anything where there is no measurement
    loss = Depth("d", loss=name).loss(prediction, target, torch.ones(2, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(prediction.grad).all()


def test_no_valid_pixel_gives_a_zero_that_keeps_the_graph() -> None:
    prediction = torch.randn(2, 1, 3, 3, requires_grad=True)
    loss = Depth("d").loss(prediction, torch.zeros(2, 1, 3, 3), torch.ones(2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad


def _reference(batches: list[tuple]) -> dict[str, float]:
    predicted, truth = [], []
    for prediction, target, valid in batches:
        mask = (target > 0) & valid[:, None, None, None]
        predicted.append(prediction[mask].double().numpy())
        truth.append(target[mask].double().numpy())
    d, g = np.concatenate(predicted), np.concatenate(truth)
    clamped = np.maximum(d, 1e-6)
    return {
        "abs_err": float(np.mean(np.abs(d - g))),
        "rel_err": float(np.mean(np.abs(d - g) / g)),
        "delta1": float(np.mean(np.maximum(clamped / g, g / clamped) < 1.25)),
    }


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_metrics_are_pixel_weighted_over_the_split(seed: int, sizes: list[int]) -> None:
    batches = [_depth_batch(seed + i, size) for i, size in enumerate(sizes)]
    batches[0][2][0] = True
    batches[0][1][0, 0, 0, 0] = 1.0
    metric = Depth("d").metric()
    for batch in batches:
        metric.update(*batch)
    result = metric.compute()
    expected = _reference(batches)
    assert set(result) == set(Depth.metric_directions)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_metric_differs_from_a_mean_of_batch_means_and_rejects_negative_depth_in_delta() -> None:
    metric = Depth("d").metric()
    metric.update(torch.full((1, 1, 1, 1), 2.0), torch.ones(1, 1, 1, 1), torch.tensor([True]))  # error 1
    metric.update(torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1, 3), torch.tensor([True]))  # 3 exact pixels
    assert metric.compute()["abs_err"] == pytest.approx(0.25)  # the mean of batch means would be 0.5
    metric.reset()
    metric.update(torch.full((1, 1, 1, 1), -1.0), torch.ones(1, 1, 1, 1), torch.tensor([True]))
    assert metric.compute()["delta1"] == 0.0
    empty = Depth("d").metric()
    empty.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([True]))
    assert all(math.isnan(v) for v in empty.compute().values())


def test_decode_draw_check_and_constructor() -> None:
    task = Depth("depth")
    prediction = torch.linspace(1, 4, 12).reshape(1, 1, 3, 4)
    (decoded,) = task.decode(prediction)
    assert decoded.shape == (3, 4) and decoded.dtype == np.float32
    assert np.allclose(decoded, prediction[0, 0].numpy())
    picture = task.draw(np.zeros((6, 8, 3), np.uint8), decoded)
    assert picture.shape == (6, 8, 3) and picture.dtype == np.uint8
    assert not np.array_equal(picture[:, 0], picture[:, -1])  # near and far differ in colour

    task.check_target(torch.rand(1, 3, 3), "depth_1.png")
    task.check_target(task.placeholder_target(3, 3), "depth_1.png")
    bad = [-torch.rand(1, 2, 2), torch.rand(2, 2), torch.full((1, 2, 2), float("nan")), torch.ones(1, 2, 2).long()]
    for target in bad:
        with pytest.raises(DataError, match="depth_9.png"):
            task.check_target(target, "depth_9.png")
    with pytest.raises(ConfigError, match="loss"):
        Depth("d", loss="huber")
    assert Depth(**{k: v for k, v in Depth("d", "berhu").describe().items() if k != "kind"}).loss_name == "berhu"
