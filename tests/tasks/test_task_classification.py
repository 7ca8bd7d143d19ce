"""Single-label classification: masked loss, split-level metrics against scikit-learn, decoding, checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import TASKS, Classification


def test_loss_is_cross_entropy_over_valid_samples_only() -> None:
    task = Classification("digit", num_classes=5)
    logits = torch.randn(6, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 99, -7])  # the last two are garbage placeholders of unlabelled samples
    valid = torch.tensor([True, True, True, True, False, False])
    loss = task.loss(logits, target, valid)
    expected = F.cross_entropy(logits[:4], target[:4])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.all(logits.grad[4:] == 0)
    assert torch.all(logits.grad[:4].abs().sum(dim=1) > 0)


def test_loss_without_valid_samples_is_zero_and_keeps_the_graph() -> None:
    task = Classification("digit", num_classes=3)
    logits = torch.randn(2, 3, requires_grad=True)
    loss = task.loss(logits, torch.tensor([0, 1]), torch.tensor([False, False]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_perfect_prediction_costs_nothing_and_label_smoothing_is_applied() -> None:
    target = torch.tensor([2, 0, 1])
    logits = 50.0 * F.one_hot(target, 3).float()
    valid = torch.ones(3, dtype=torch.bool)
    assert Classification("c", 3).loss(logits, target, valid).item() < 1e-6
    smooth = Classification("c", 3, label_smoothing=0.1)
    noisy = torch.randn(3, 3)
    assert torch.allclose(smooth.loss(noisy, target, valid), F.cross_entropy(noisy, target, label_smoothing=0.1))


def _accumulate(task: Classification, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
    metric = task.metric().to("cpu")
    for logits, target, valid in batches:
        metric.update(logits, target, valid)
    return metric.compute()


def _random_batches(seed: int, num_classes: int, sizes: list[int]) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        logits = torch.randn(size, num_classes, generator=generator)
        target = torch.randint(0, num_classes, (size,), generator=generator)
        valid = torch.rand(size, generator=generator) < 0.8
        batches.append((logits, target, valid))
    return batches


def _sklearn_reference(batches: list[tuple]) -> dict[str, float]:
    predicted = np.concatenate([b[0][b[2]].argmax(1).numpy() for b in batches])
    truth = np.concatenate([b[1][b[2]].numpy() for b in batches])
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
    return {"accuracy": accuracy_score(truth, predicted), "precision": precision, "recall": recall, "f1": f1}


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_classes=st.integers(2, 7),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
)
def test_metrics_match_sklearn_over_the_whole_split(seed: int, num_classes: int, sizes: list[int]) -> None:
    batches = _random_batches(seed, num_classes, sizes)
    if not any(bool(b[2].any()) for b in batches):
        batches[0][2][0] = True
    result = _accumulate(Classification("c", num_classes), batches)
    expected = _sklearn_reference(batches)
    assert set(result) == set(Classification.metric_directions)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key


def test_accuracy_is_over_samples_not_a_mean_of_batch_means() -> None:
    right, wrong = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    batches = [
        (right, torch.tensor([0]), torch.tensor([True])),  # batch accuracy 1
        (torch.cat([wrong, wrong, wrong]), torch.tensor([0, 0, 0]), torch.ones(3, dtype=torch.bool)),  # 0
    ]
    result = _accumulate(Classification("c", 2), batches)
    assert result["accuracy"] == pytest.approx(0.25)  # a mean of batch means would say 0.5


def test_metric_without_valid_samples_is_nan_and_reset_forgets() -> None:
    task = Classification("c", 3)
    metric = task.metric()
    metric.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.bool))
    assert all(math.isnan(v) for v in metric.compute().values())
    metric.update(torch.eye(3) * 9, torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool))
    assert metric.compute()["accuracy"] == pytest.approx(1.0)
    metric.reset()
    metric.update(torch.eye(3) * 9, torch.tensor([1, 2, 0]), torch.ones(3, dtype=torch.bool))
    assert metric.compute()["accuracy"] == pytest.approx(0.0)


def test_decode_and_draw() -> None:
    task = Classification("shape", 3, class_names=["circle", "square", "triangle"])
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    decoded = task.decode(logits)
    assert [d["label"] for d in decoded] == [1, 0]
    assert decoded[0]["class_name"] == "square"
    assert sum(decoded[0]["probabilities"]) == pytest.approx(1.0)
    assert decoded[0]["score"] == pytest.approx(max(decoded[0]["probabilities"]))
    assert isinstance(decoded[0]["label"], int) and isinstance(decoded[0]["score"], float)
    image = np.full((48, 64, 3), 128, dtype=np.uint8)
    picture = task.draw(image, decoded[0])
    assert picture.shape == image.shape and picture.dtype == np.uint8
    assert (picture != image).any()  # the label is written on it


def test_check_target_names_the_sample() -> None:
    task = Classification("digit", 10)
    task.check_target(torch.tensor(9), "train/3")
    task.check_target(task.placeholder_target(8, 8), "train/4")
    cases = [torch.tensor(10), torch.tensor(-1), torch.tensor(1.0), torch.tensor([1]), 3]
    for bad in cases:
        with pytest.raises(DataError, match="train/7"):
            task.check_target(bad, "train/7")


def test_constructor_rejects_bad_parameters_and_describe_round_trips() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        Classification("c", 1)
    with pytest.raises(ConfigError, match="class_names"):
        Classification("c", 3, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        Classification("c", 3, label_smoothing=1.0)
    task = TASKS.get("classification")("c", 3, class_names=["a", "b", "c"], label_smoothing=0.1)
    description = task.describe()
    assert description["kind"] == "classification"
    params = {k: v for k, v in description.items() if k != "kind"}
    assert Classification(**params).describe() == description
    assert task.output_channels == 3 and task.primary_metric in task.metric_directions
