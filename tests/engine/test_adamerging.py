"""AdaMerging: the merged weights θ_0 + Σ λ τ for given coefficients, coefficients learnt on hand-made
objectives whose optimum is known, the entropy of each task kind against a direct computation, the
test-time objective (determinism with a seed, BatchNorm on batch statistics, regression tasks refused or fitted
to their expert) and refusals of bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from mtlvision.engine.merge import merge_states
from mtlvision.engine.merging import AdaMerging, make_rule
from mtlvision.engine.merging.adamerging import merged_tensors
from mtlvision.engine.merging.entropy import PREDICTION_ENTROPY, bernoulli_entropy, softmax_entropy
from mtlvision.engine.merging.test_time import EntropyObjective, stack_images
from mtlvision.errors import ConfigError
from tests.engine.tinyrun import TinyScenes, tiny_model

BASE = {"a": torch.zeros(2), "b": torch.ones(3)}
# two experts: task vectors (1, 0) and (0, 2) on "a", (1, 1, 1) and (-1, 0, 0) on "b"
EXPERTS = {
    "a": torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
    "b": torch.tensor([[2.0, 2.0, 2.0], [0.0, 1.0, 1.0]]),
}


def test_merged_tensors_are_the_base_plus_the_weighted_task_vectors() -> None:
    vectors = {k: v - BASE[k] for k, v in EXPERTS.items()}
    layer = merged_tensors(torch.tensor([[0.5, 0.25], [1.0, 0.0]]), vectors, BASE)
    torch.testing.assert_close(layer["a"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(layer["b"], torch.tensor([2.0, 2.0, 2.0]))
    task = merged_tensors(torch.tensor([[0.5, 0.25]]), vectors, BASE)
    torch.testing.assert_close(task["a"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(task["b"], torch.tensor([1.25, 1.5, 1.5]))


def _quadratic(targets: dict[str, torch.Tensor]):
    return lambda shared: sum(((shared[k] - targets[k]) ** 2).sum() for k in targets)


def test_layer_wise_learns_each_tensors_coefficients_and_clamps_them_to_one() -> None:
    # optimum: λ = (0.5, 0.8) on "a"; on "b" λ_1 = 0.2 with λ_2 wanting 1.5, clamped to 1
    vectors = {k: v - BASE[k] for k, v in EXPERTS.items()}
    wanted = torch.tensor([[0.5, 0.8], [0.2, 1.5]])
    targets = merged_tensors(wanted, vectors, BASE)
    rule = AdaMerging(granularity="layer", steps=600, lr=0.02)
    merged = rule.learn(EXPERTS, BASE, _quadratic({"a": targets["a"]}))
    torch.testing.assert_close(merged["a"], targets["a"], atol=2e-3, rtol=0)
    assert rule.learned["coefficients"]["a"] == pytest.approx([0.5, 0.8], abs=2e-3)
    assert rule.learned["coefficients"]["b"] == [0.3, 0.3]  # no gradient: stays at the prior
    rule = AdaMerging(granularity="layer", steps=600, lr=0.02)
    merged = rule.learn(EXPERTS, BASE, _quadratic(targets))
    coefficients = rule.learned["coefficients"]
    assert coefficients["b"][1] == 1.0 and coefficients["a"] == pytest.approx([0.5, 0.8], abs=2e-3)
    # the merged weights are exactly θ_0 + Σ λ τ with the recorded (rounded) coefficients
    recorded = torch.tensor([coefficients["a"], coefficients["b"]])
    for key, value in merged_tensors(recorded, vectors, BASE).items():
        torch.testing.assert_close(merged[key], value, atol=1e-4, rtol=0)
    assert rule.learned["objective_last_step"] < rule.learned["objective_first_step"]


def test_task_wise_learns_one_coefficient_per_task_for_every_tensor() -> None:
    vectors = {k: v - BASE[k] for k, v in EXPERTS.items()}
    targets = merged_tensors(torch.tensor([[0.6, 0.1]]), vectors, BASE)
    rule = AdaMerging(granularity="task", steps=600, lr=0.02)
    merged = rule.learn(EXPERTS, BASE, _quadratic(targets))
    assert rule.learned["coefficients"] == pytest.approx([0.6, 0.1], abs=2e-3)
    for key in targets:
        torch.testing.assert_close(merged[key], targets[key], atol=3e-3, rtol=0)


def test_no_step_is_task_arithmetic_at_the_prior() -> None:
    rule = AdaMerging(granularity="task", steps=1, lr=1e-9)
    merged = rule.learn(EXPERTS, BASE, lambda shared: sum(v.sum() for v in shared.values()))
    expected = make_rule("task_arithmetic", {"scale": 0.3}).merge(EXPERTS, BASE)
    for key in EXPERTS:
        torch.testing.assert_close(merged[key], expected[key])


def test_entropies_match_a_direct_computation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    probabilities = logits.softmax(1)
    expected = -(probabilities * probabilities.log()).sum(1).mean()
    torch.testing.assert_close(PREDICTION_ENTROPY.get("classification")(logits), expected)
    assert float(softmax_entropy(torch.zeros(1, 7))[0]) == pytest.approx(math.log(7))
    pixels = torch.randn(2, 3, 4, 4)
    p = pixels.softmax(1)
    torch.testing.assert_close(PREDICTION_ENTROPY.get("segmentation")(pixels), -(p * p.log()).sum(1).mean())
    labels = torch.randn(3, 4)
    q = torch.sigmoid(labels)
    bernoulli = -(q * q.log() + (1 - q) * (1 - q).log())
    torch.testing.assert_close(bernoulli_entropy(labels), bernoulli)
    torch.testing.assert_close(PREDICTION_ENTROPY.get("multilabel")(labels), bernoulli.sum(1).mean())
    detection = {"cls_logits": torch.zeros(2, 6, 3), "centerness": torch.zeros(2, 6)}
    assert float(PREDICTION_ENTROPY.get("detection")(detection)) == pytest.approx(3 * math.log(2))
    assert "depth" not in PREDICTION_ENTROPY and "normals" not in PREDICTION_ENTROPY


def _images(n: int = 12) -> torch.Tensor:
    data = TinyScenes(n)
    return torch.stack([data[i]["image"] for i in range(n)])


def test_regression_tasks_are_refused_unless_fitted_to_their_expert() -> None:
    with pytest.raises(ConfigError, match="task 'depth' \\(depth, a regression\\).*regression=expert"):
        EntropyObjective(tiny_model(0), _images(), batch_size=4, batches=1, seed=0)
    with pytest.raises(ConfigError, match="needs the expert of task 'depth'"):
        EntropyObjective(tiny_model(0), _images(), batch_size=4, batches=1, seed=0, regression="expert")


def test_the_objective_is_the_entropies_plus_the_distance_to_the_depth_expert() -> None:
    model, expert, images = tiny_model(0), tiny_model(1).eval(), _images()
    objective = EntropyObjective(
        model, images, batch_size=len(images), batches=1, seed=0, regression="expert", experts={"depth": expert}
    )
    shared = {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("architecture.")}
    with torch.no_grad():
        out = model(images)
        target = expert(images)["depth"]
    expected = (
        softmax_entropy(out["cls"]).mean() + softmax_entropy(out["seg"]).mean() + (out["depth"] - target).abs().mean()
    )
    torch.testing.assert_close(objective(shared), expected)
    # the expert's own weights in the merged model: its depth term vanishes
    own = EntropyObjective(
        expert, images, batch_size=len(images), batches=1, seed=0, regression="expert", experts={"depth": expert}
    )
    with torch.no_grad():
        out = expert(images)
    entropies = softmax_entropy(out["cls"]).mean() + softmax_entropy(out["seg"]).mean()
    torch.testing.assert_close(own(dict(expert.named_parameters())), entropies)


def test_the_batches_drawn_are_fixed_by_the_seed() -> None:
    model, images = tiny_model(0), _images()
    experts = {"depth": tiny_model(1)}
    shared = dict(model.named_parameters())

    def losses(seed: int) -> list[float]:
        objective = EntropyObjective(
            model, images, batch_size=3, batches=1, seed=seed, regression="expert", experts=experts
        )
        return [float(objective(shared).detach()) for _ in range(2)]

    assert losses(0) == losses(0) and losses(0) != losses(1)


def test_adamerging_through_merge_states_lowers_the_entropy_of_the_merge() -> None:
    experts = {"cls+seg+depth": tiny_model(1).state_dict(), "x": tiny_model(2).state_dict()}
    # a second "expert" of the same tasks stands for another fine-tune: only the shared part is merged here
    base = {k: v for k, v in tiny_model(0).state_dict().items() if k.startswith("architecture.")}
    shared_only = {name: {k: v for k, v in s.items() if k in base} for name, s in experts.items()}
    target = tiny_model(3)
    shared_only["cls+seg+depth"].update({k: v for k, v in experts["cls+seg+depth"].items() if k.startswith("heads.")})
    images = _images(16)
    objective = EntropyObjective(
        target, images, batch_size=16, batches=1, seed=0, regression="expert", experts={"depth": tiny_model(1)}
    )
    rule = AdaMerging(granularity="layer", steps=8, lr=0.05)
    state, report = merge_states(target, shared_only, rule, base, objective=objective)
    assert sorted(report.merged) == sorted(base)
    assert rule.learned["objective_last_step"] < rule.learned["objective_first_step"]
    coefficients = torch.tensor([rule.learned["coefficients"][k] for k in report.merged])
    vectors = {k: torch.stack([shared_only[n][k] for n in shared_only]) - base[k] for k in report.merged}
    for key, value in merged_tensors(coefficients, vectors, base).items():
        torch.testing.assert_close(state[key], value, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="learns its coefficients"):
        merge_states(tiny_model(3), shared_only, AdaMerging(steps=1), base)
    with pytest.raises(ConfigError, match="learns its coefficients on unlabelled batches"):
        rule.merge(vectors, base)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"granularity": "block"}, "granularity must be one of task, layer"),
        ({"split": "holdout"}, "split must be one of train, val, test"),
        ({"regression": "drop"}, "regression must be one of refuse, expert"),
        ({"prior": 1.5}, "prior must be in \\[0.0, 1.0\\]"),
        ({"lr": 0.0}, "lr must be in"),
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"seed": -1}, "seed must be a whole number >= 0"),
        ({"temperature": 1}, "its hyper-parameters: granularity, prior"),
    ],
)
def test_bad_settings_are_named(setting: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_rule("adamerging", setting)


def test_images_of_different_sizes_or_none_are_refused() -> None:
    with pytest.raises(ConfigError, match="different sizes"):
        stack_images([torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 9, 8)], "the test split")
    with pytest.raises(ConfigError, match="the test split holds no images"):
        stack_images([], "the test split")
