"""Distillation terms and the Distillation auxiliary loss: zero when the student equals the expert, positive
otherwise, independent of labels, frozen experts outside the optimiser, and one training step through the Trainer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import rel_entr, softmax

from mtlvision.engine.distill import DISTILL_TERMS, Distillation, DistillSettings, feature_distance
from mtlvision.engine.trainer import Trainer
from mtlvision.errors import ConfigError
from mtlvision.models import MultiTaskModel
from tests.engine.tinyrun import SIZE, TinyScenes, _without_batch_norm, tiny_backbone, tiny_model

SHAPES = {
    "classification": (4, 5),
    "segmentation": (2, 3, 6, 5),
    "multilabel": (3, 4),
    "depth": (2, 1, 6, 5),
    "normals": (2, 3, 6, 5),
}


def _prediction(kind: str, seed: int) -> torch.Tensor:
    value = torch.randn(SHAPES[kind], generator=torch.Generator().manual_seed(seed)) * 3
    return torch.nn.functional.normalize(value, dim=1) if kind == "normals" else value


@given(st.sampled_from(sorted(SHAPES)), st.integers(0, 10_000), st.floats(0.5, 8.0), st.sampled_from(["l1", "l2"]))
@settings(max_examples=60, deadline=None)
def test_every_term_is_zero_for_the_expert_itself_and_positive_otherwise(kind, seed, temperature, regression):
    term = DISTILL_TERMS.get(kind)
    options = DistillSettings(temperature, regression)
    teacher = _prediction(kind, seed)
    assert abs(float(term(teacher.clone(), teacher, options))) < 1e-5
    assert float(term(_prediction(kind, seed + 1), teacher, options)) > 1e-4


def _detection_outputs(seed: int, locations: int = 7, classes: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "cls_logits": torch.randn(2, locations, classes, generator=g) * 3,
        "centerness": torch.randn(2, locations, generator=g),
        "box_distances": torch.rand(2, locations, 4, generator=g) * 20 + 0.5,
        "points": torch.arange(locations * 2, dtype=torch.float32).reshape(locations, 2),
        "strides": torch.full((locations,), 4.0),
        "image_size": (16, 16),
    }


@given(st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_detection_term_is_zero_for_the_expert_itself_and_positive_otherwise(seed):
    term, options = DISTILL_TERMS.get("detection"), DistillSettings()
    teacher = _detection_outputs(seed)
    assert (
        abs(float(term({k: v.clone() if torch.is_tensor(v) else v for k, v in teacher.items()}, teacher, options)))
        < 1e-5
    )
    student = {**_detection_outputs(seed + 1), "points": teacher["points"]}
    assert float(term(student, teacher, options)) > 1e-4


def test_detection_term_weights_boxes_by_the_experts_score() -> None:
    teacher = _detection_outputs(0, locations=2, classes=1)
    teacher["cls_logits"] = torch.tensor([[[10.0], [-10.0]]] * 2)  # an object at location 0 only
    teacher["centerness"] = torch.full((2, 2), 10.0)
    student = {k: v.clone() if torch.is_tensor(v) else v for k, v in teacher.items()}
    student["box_distances"][:, 1] *= 5  # off by log 5 on every side where the expert sees (almost) nothing
    student["box_distances"][:, 0] *= 2  # off by log 2 where it sees an object
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    seen, unseen = np.sqrt(sigmoid(10) * sigmoid(10)), np.sqrt(sigmoid(-10) * sigmoid(10))
    expected = (seen * 4 * np.log(2) + unseen * 4 * np.log(5)) / (seen + unseen)
    got = float(DISTILL_TERMS.get("detection")(student, teacher, DistillSettings()))
    assert got == pytest.approx(expected, rel=1e-4) and got < 4 * np.log(2) + 0.05


def test_detection_term_needs_the_same_locations() -> None:
    teacher = _detection_outputs(0)
    student = {**_detection_outputs(1), "points": teacher["points"] + 1}
    with pytest.raises(ConfigError, match="same pyramid levels"):
        DISTILL_TERMS.get("detection")(student, teacher, DistillSettings())


def test_classification_term_is_t_squared_times_the_kl_of_softened_distributions() -> None:
    student, teacher, temperature = _prediction("classification", 0), _prediction("classification", 1), 3.0
    p = softmax(teacher.double().numpy() / temperature, axis=1)
    q = softmax(student.double().numpy() / temperature, axis=1)
    expected = rel_entr(p, q).sum(1).mean() * temperature**2
    value = DISTILL_TERMS.get("classification")(student, teacher, DistillSettings(temperature))
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_segmentation_term_is_the_per_pixel_kl() -> None:
    student, teacher, temperature = _prediction("segmentation", 2), _prediction("segmentation", 3), 2.0
    p = softmax(teacher.double().numpy() / temperature, axis=1)
    q = softmax(student.double().numpy() / temperature, axis=1)
    expected = rel_entr(p, q).sum(1).mean() * temperature**2
    value = DISTILL_TERMS.get("segmentation")(student, teacher, DistillSettings(temperature))
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_multilabel_term_is_the_bernoulli_kl_to_the_experts_sigmoid() -> None:
    student, teacher = _prediction("multilabel", 4), _prediction("multilabel", 5)
    p, q = torch.sigmoid(teacher).double().numpy(), torch.sigmoid(student).double().numpy()
    expected = (rel_entr(p, q) + rel_entr(1 - p, 1 - q)).mean()
    assert float(DISTILL_TERMS.get("multilabel")(student, teacher, DistillSettings())) == pytest.approx(
        expected, rel=1e-4
    )


def test_regression_terms_are_l1_and_l2_distances() -> None:
    student, teacher = _prediction("depth", 6), _prediction("depth", 7)
    diff = (student - teacher).numpy()
    assert float(DISTILL_TERMS.get("depth")(student, teacher, DistillSettings(regression="l1"))) == pytest.approx(
        np.abs(diff).mean(), rel=1e-5
    )
    assert float(DISTILL_TERMS.get("depth")(student, teacher, DistillSettings(regression="l2"))) == pytest.approx(
        (diff**2).mean(), rel=1e-5
    )


def test_feature_distance_ignores_scale_and_resizes() -> None:
    features = torch.randn(2, 4, 3, 3)
    assert float(feature_distance(features * 5, features)) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_distance(-features, features)) == pytest.approx(4.0, rel=1e-5)
    assert feature_distance(torch.randn(2, 4, 6, 6), features).ndim == 0


# ---------------------------------------------------------------------------------- the auxiliary loss
def _experts_of(student: MultiTaskModel) -> dict[str, MultiTaskModel]:
    """Single-task copies of the student: its backbone and that task's head."""
    experts = {}
    for name, task in student.tasks.items():
        expert = MultiTaskModel(tiny_backbone, [task])
        _without_batch_norm(expert)
        own = expert.state_dict()
        expert.load_state_dict({k: v for k, v in student.state_dict().items() if k in own})
        experts[name] = expert
    return experts


def _batch(valid: bool = True) -> dict:
    data = TinyScenes(4, seed=3)
    return {
        "image": torch.stack([data[i]["image"] for i in range(4)]),
        "valid": {n: torch.full((4,), valid) for n in ("cls", "seg", "depth")},
    }


def _distill(student, experts, **kwargs) -> Distillation:
    return Distillation(student.tasks, experts, student=student, probe=torch.rand(1, 3, SIZE, SIZE), **kwargs)


def test_distillation_is_zero_when_the_student_is_its_experts_and_positive_after_a_change() -> None:
    student = tiny_model(0)
    loss = _distill(student, _experts_of(student), feature_weight=1.0)
    batch = _batch()
    predictions, representation = student.forward_with_representation(batch["image"])
    terms = loss(batch, predictions, representation)
    assert terms.shape == (3,)
    torch.testing.assert_close(terms, torch.zeros(3), atol=1e-5, rtol=0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    predictions, representation = student.forward_with_representation(batch["image"])
    assert bool((loss(batch, predictions, representation) > 1e-4).all())


def test_distillation_applies_to_unlabelled_samples_and_follows_the_weights() -> None:
    student, other = tiny_model(0), tiny_model(1)
    experts = _experts_of(other)
    loss = _distill(student, experts, feature_weight=0.0)
    predictions = student(_batch()["image"])
    labelled = loss(_batch(True), predictions, None)
    unlabelled = loss(_batch(False), predictions, None)
    torch.testing.assert_close(labelled, unlabelled)
    assert bool((labelled > 0).all())
    weighted = _distill(student, experts, feature_weight=0.0, weights={"cls": 2.0, "seg": 0.0})
    halved = weighted(_batch(), predictions, None)
    torch.testing.assert_close(halved, torch.stack([2 * labelled[0], torch.tensor(0.0), labelled[2]]))


def test_experts_are_frozen_outside_the_parameters_and_checkpoint_but_move_with_the_loss() -> None:
    student = tiny_model(0)
    loss = _distill(student, _experts_of(tiny_model(1)))
    names = [n for n, _ in loss.named_parameters()]
    assert names and all(n.startswith("adapters.") for n in names)
    assert all(k.startswith("adapters.") for k in loss.state_dict())
    for adapter in loss.adapters.values():  # started at the identity
        torch.testing.assert_close(adapter.weight[:, :, 0, 0], torch.eye(16))
    loss.to(torch.float64)
    expert = loss._experts["cls"]
    assert next(expert.parameters()).dtype == torch.float64
    assert not expert.training and not any(p.requires_grad for p in expert.parameters())


def test_bad_set_ups_are_named() -> None:
    student = tiny_model(0)
    experts = _experts_of(student)
    with pytest.raises(ConfigError, match="no expert for task 'depth'"):
        _distill(student, {k: v for k, v in experts.items() if k != "depth"})
    with pytest.raises(ConfigError, match="names task\\(s\\) colour"):
        _distill(student, experts, weights={"colour": 1.0})
    with pytest.raises(ConfigError, match="leaves every task out"):
        _distill(student, experts, weights={"cls": 0, "seg": 0, "depth": 0})
    wrong = {**experts, "cls": experts["seg"]}
    with pytest.raises(ConfigError, match="does not predict a classification task 'cls'"):
        _distill(student, wrong)
    keypoints = SimpleNamespace(kind="keypoints", output_channels=3)  # a user's task kind without a term
    with pytest.raises(ConfigError, match="no term for task 'points' of kind 'keypoints'"):
        Distillation({"points": keypoints}, {}, feature_weight=0.0)


def test_the_trainer_optimises_the_adapters_and_adds_the_terms(tmp_path) -> None:
    student = tiny_model(0)
    loss = _distill(student, _experts_of(tiny_model(1)), feature_weight=1.0)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    trainer = Trainer(student, "ew", epochs=1, batch_size=4, lr=1e-2, auxiliary=loss, progress=False, run_dir=tmp_path)
    assert any(g.get("name") == "auxiliary" for g in trainer.optimizer.param_groups)
    batch = _batch()
    batch["targets"] = {
        n: torch.stack([TinyScenes(4, seed=3)[i]["targets"][n] for i in range(4)]) for n in ("cls", "seg", "depth")
    }
    with torch.no_grad():
        plain = trainer.task_losses(student(batch["image"]), batch)
    total, _ = trainer._forward_losses(batch)
    assert bool((total.detach() > plain).all())
    trainer.fit(TinyScenes(8))
    assert any(not torch.equal(before[k], v) for k, v in loss.state_dict().items())
    assert set(trainer.checkpoint_state()["auxiliary"]) == set(before)
