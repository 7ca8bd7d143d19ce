"""Surface normals: unit-vector losses over valid pixels, angular metrics against numpy, decoding, checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import Normals
from mtlvision.tasks.normals import NORMAL_LOSSES, NormalsMetric, angular_error


def _normals_batch(seed: int, size: int, height: int = 4, width: int = 5, noise: float = 0.6) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    target = F.normalize(torch.randn(size, 3, height, width, generator=generator), dim=1)
    target = target * (torch.rand(size, 1, height, width, generator=generator) > 0.25)  # zero: no normal
    raw = target + noise * torch.randn(size, 3, height, width, generator=generator)
    valid = torch.rand(size, generator=generator) < 0.8
    return raw, target, valid


@pytest.mark.parametrize("name", sorted(NORMAL_LOSSES))
def test_loss_matches_numpy_and_ignores_invalid_pixels_and_samples(name: str) -> None:
    raw, target, _ = _normals_batch(0, 3)
    raw.requires_grad_(True)
    valid = torch.tensor([True, False, True])
    task = Normals("n", loss=name)
    loss = task.loss(task.postprocess(raw), target, valid)

    unit = raw.detach().numpy() / np.linalg.norm(raw.detach().numpy(), axis=1, keepdims=True)
    truth = target.numpy()
    mask = (np.linalg.norm(truth, axis=1) > 0) & valid.numpy()[:, None, None]
    per_pixel = 1 - (unit * truth).sum(1) if name == "cosine" else np.abs(unit - truth).sum(1)
    expected = np.mean([per_pixel[i][mask[i]].mean() for i in (0, 2)])
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)

    loss.backward()
    gradient = np.abs(raw.grad.numpy()).sum(1)
    assert np.all(gradient[~mask] == 0)
    assert np.all(gradient[mask] > 0)


@pytest.mark.parametrize("name", sorted(NORMAL_LOSSES))
def test_perfect_prediction_costs_nothing_at_any_scale(name: str) -> None:
    _, target, _ = _normals_batch(1, 2)
    task = Normals("n", loss=name)
    loss = task.loss(task.postprocess(3.7 * target), target, torch.ones(2, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert task.loss(3.7 * target, target, torch.ones(2, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-6)


def test_postprocess_gives_unit_vectors() -> None:
    unit = Normals("n").postprocess(torch.randn(2, 3, 4, 4) * 5)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2, 4, 4), atol=1e-6)


def test_angular_error_is_precise_near_zero() -> None:
    angle = math.radians(0.005)
    a = torch.tensor([[1.0, 0.0, 0.0]]).view(1, 3, 1, 1)
    b = torch.tensor([[math.cos(angle), math.sin(angle), 0.0]]).view(1, 3, 1, 1)
    assert angular_error(a, b).item() == pytest.approx(0.005, rel=1e-3)
    assert angular_error(a, -a).item() == pytest.approx(180.0)


def _reference(batches: list[tuple]) -> dict[str, float]:
    errors = []
    for raw, target, valid in batches:
        unit = raw.double().numpy()
        unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
        truth = target.double().numpy()
        mask = (np.linalg.norm(truth, axis=1) > 0) & valid.numpy()[:, None, None]
        cosine = np.clip((unit * truth).sum(1), -1, 1)
        errors.append(np.degrees(np.arccos(cosine))[mask])
    e = np.concatenate(errors)
    return {
        "mean_angle": float(e.mean()),
        "median_angle": float(np.median(e)),
        "within_11_25": 100 * float(np.mean(e < 11.25)),
        "within_22_5": 100 * float(np.mean(e < 22.5)),
        "within_30": 100 * float(np.mean(e < 30)),
        "pixels": e.size,
    }


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    noise=st.sampled_from([0.05, 0.3, 1.0]),
)
def test_metrics_match_numpy_over_the_whole_split(seed: int, sizes: list[int], noise: float) -> None:
    batches = [_normals_batch(seed + i, size, noise=noise) for i, size in enumerate(sizes)]
    batches[0][2][0] = True
    batches[0][1][0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    metric = Normals("n").metric()
    for batch in batches:
        metric.update(*batch)
    result = metric.compute()
    expected = _reference(batches)
    assert set(result) == set(Normals.metric_directions)
    assert result["mean_angle"] == pytest.approx(expected["mean_angle"], abs=1e-3)
    # The histogram median is within one bin (0.001°) of the exact one; float32 errors add ~1e-4°.
    assert result["median_angle"] == pytest.approx(expected["median_angle"], abs=2e-3)
    for key in ("within_11_25", "within_22_5", "within_30"):
        # A pixel within float32 rounding of a threshold may fall either side; allow one such pixel.
        assert result[key] == pytest.approx(expected[key], abs=100 / expected["pixels"] + 1e-9), key


def test_median_over_many_pixels_and_empty_split() -> None:
    generator = torch.Generator().manual_seed(3)
    metric = NormalsMetric("n")
    angles = torch.rand(20_001, generator=generator) * 90.0
    radians = torch.deg2rad(angles.double())
    prediction = torch.stack([torch.sin(radians), torch.zeros_like(radians), torch.cos(radians)]).float()
    target = torch.tensor([0.0, 0.0, 1.0]).view(3, 1).expand(3, angles.numel())
    metric.update(prediction[None, :, None, :], target[None, :, None, :], torch.tensor([True]))
    result = metric.compute()
    assert result["median_angle"] == pytest.approx(float(np.median(angles.numpy())), abs=2e-3)
    assert result["within_30"] == pytest.approx(100 * float((angles < 30).double().mean()), abs=0.01)
    empty = NormalsMetric("n")
    empty.update(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.tensor([True]))
    assert all(math.isnan(v) for v in empty.compute().values())


def test_decode_draw_check_and_constructor() -> None:
    task = Normals("normals")
    raw = torch.zeros(1, 3, 2, 3)
    raw[0, 2] = 2.0  # facing the camera
    (decoded,) = task.decode(raw)
    assert decoded.shape == (2, 3, 3) and decoded.dtype == np.float32
    assert np.allclose(decoded[..., 2], 1.0)
    picture = task.draw(np.zeros((4, 6, 3), np.uint8), decoded)
    assert picture.shape == (4, 6, 3) and picture.dtype == np.uint8
    assert np.all(picture == np.array([128, 128, 255], dtype=np.uint8))

    good = F.normalize(torch.randn(3, 4, 4), dim=0)
    good[:, 0, 0] = 0.0
    task.check_target(good, "normal_1.npy")
    task.check_target(task.placeholder_target(4, 4), "normal_1.npy")
    for bad in [good * 1.5, good[:2], good.double()[None], torch.full((3, 2, 2), float("inf"))]:
        with pytest.raises(DataError, match="normal_9.npy"):
            task.check_target(bad, "normal_9.npy")
    with pytest.raises(ConfigError, match="loss"):
        Normals("n", loss="l2")
    assert Normals(**{k: v for k, v in Normals("n", "l1").describe().items() if k != "kind"}).loss_name == "l1"
