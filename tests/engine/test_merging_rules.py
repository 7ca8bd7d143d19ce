"""The merging rules beyond averaging on hand-made task vectors whose merged weights are computed here
independently: DARE, TSV-M, Iso-C, Iso-CTS, Model Stock; determinism with a seed; refusals of bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mtlvision.engine.merge import merge_states
from mtlvision.engine.merging import (
    MERGE_RULES,
    DareTaskArithmetic,
    DareTies,
    IsoC,
    IsoCTS,
    LearnedRule,
    ModelStock,
    TaskArithmetic,
    TaskSingularVectors,
    Ties,
    WEMoE,
    make_rule,
)
from mtlvision.errors import ConfigError
from mtlvision.models import MultiTaskModel
from mtlvision.tasks import TASKS
from tests.engine.tinyrun import tiny_backbone


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor M (MᵀM)^(-1/2), by an eigendecomposition (not the SVD the rules use)."""
    gram = matrix.double().T @ matrix.double()
    values, vectors = torch.linalg.eigh(gram)
    return (matrix.double() @ vectors @ torch.diag(values.rsqrt()) @ vectors.T).float()


# ------------------------------------------------------------------------------------------------- DARE
def test_dare_keeps_each_entry_rescaled_or_drops_it_at_the_asked_rate() -> None:
    torch.manual_seed(0)
    base, tau = torch.randn(20_000), torch.randn(20_000)
    merged = DareTaskArithmetic(drop=0.7, scale=1.0, seed=3)(torch.stack([base + tau]), base)
    delta = merged - base
    kept = delta != 0
    torch.testing.assert_close(delta[kept], tau[kept] / 0.3)
    assert abs((~kept).float().mean().item() - 0.7) < 0.02  # binomial: 5 standard deviations ≈ 0.016


def test_dare_is_unbiased_deterministic_with_its_seed_and_is_task_arithmetic_without_dropping() -> None:
    torch.manual_seed(1)
    base = torch.randn(50)
    experts = base + torch.randn(2, 50)
    rule = DareTaskArithmetic(drop=0.5, scale=0.3, seed=7)
    assert torch.equal(rule(experts, base), DareTaskArithmetic(drop=0.5, scale=0.3, seed=7)(experts, base))
    assert not torch.equal(rule(experts, base), DareTaskArithmetic(drop=0.5, scale=0.3, seed=8)(experts, base))
    mean = torch.stack([DareTaskArithmetic(drop=0.5, scale=0.3, seed=s)(experts, base) for s in range(2000)]).mean(0)
    torch.testing.assert_close(mean, TaskArithmetic(scale=0.3)(experts, base), atol=0.06, rtol=0)
    torch.testing.assert_close(DareTaskArithmetic(drop=0.0, scale=0.3)(experts, base), TaskArithmetic()(experts, base))


def test_dare_ties_without_dropping_is_ties() -> None:
    base = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.5, 0.0])
    experts = torch.stack([base + torch.tensor([3.0, -1.0, 0.5, -4.0, 5.0, 0.2]), base - 1.5])
    torch.testing.assert_close(DareTies(drop=0.0, density=0.5)(experts, base), Ties(density=0.5)(experts, base))
    dropped = DareTies(drop=0.5, seed=2)(experts, base) - base
    # every entry is one of the two rescaled task-vector entries, or their mean when both are kept and agree
    tau = (experts - base) * 2
    for j, value in enumerate(dropped):
        allowed = {0.0, tau[0, j].item(), tau[1, j].item()}
        if tau[0, j].sign() == tau[1, j].sign():
            allowed.add(tau[:, j].mean().item())
        assert any(math.isclose(value.item(), a, abs_tol=1e-6) for a in allowed), (j, value, allowed)


# ------------------------------------------------------------------------------------------------ TSV-M
def test_tsv_m_on_two_rank_one_task_matrices_is_their_orthogonalised_singular_triplets() -> None:
    base = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    e1, a = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]) / math.sqrt(2)
    tau1, tau2 = 3 * torch.outer(e1, e1), 2 * torch.outer(a, a)
    merged = TaskSingularVectors(alpha=1.0).merge_tensor(torch.stack([base + tau1, base + tau2]), base)
    u = _polar(torch.stack([e1, a], 1))  # TSV-M keeps 2/2 = 1 direction per task, orthogonalises U and V
    expected = base + u @ torch.diag(torch.tensor([3.0, 2.0])) @ u.T
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    tau2_orthogonal = 2 * torch.outer(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    merged = TaskSingularVectors(alpha=0.5).merge_tensor(torch.stack([base + tau1, base + tau2_orthogonal]), base)
    torch.testing.assert_close(merged, base + 0.5 * torch.diag(torch.tensor([3.0, 2.0])))


def test_tsv_m_keeps_one_expert_and_treats_convolutions_as_matrices_and_vectors_by_their_mean() -> None:
    torch.manual_seed(2)
    base, expert = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(TaskSingularVectors().merge_tensor(expert[None], base), expert, atol=1e-5, rtol=1e-5)
    experts = base + torch.randn(2, 4, 3, 3, 3)
    conv = TaskSingularVectors().merge_tensor(experts, base)
    flat = TaskSingularVectors().merge_tensor(experts.flatten(2), base.flatten(1))
    torch.testing.assert_close(conv.flatten(1), flat)
    bias_base, biases = torch.zeros(3), torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])
    torch.testing.assert_close(TaskSingularVectors(alpha=2.0).merge_tensor(biases, bias_base), 2 * biases.mean(0))


# ---------------------------------------------------------------------------------------- Iso-C, Iso-CTS
def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors() -> None:
    base = torch.ones(2, 2)
    experts = torch.stack([base + torch.diag(torch.tensor([3.0, 0.0])), base + torch.diag(torch.tensor([0.0, 1.0]))])
    torch.testing.assert_close(IsoC().merge_tensor(experts, base), base + 2 * torch.eye(2))
    torch.testing.assert_close(IsoC(alpha=1.5).merge_tensor(experts, base), base + 3 * torch.eye(2))
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]])  # singular directions are carried, values made equal
    rotated = torch.stack([base + rotation @ (e - base) for e in experts])
    torch.testing.assert_close(IsoC().merge_tensor(rotated, base), base + 2 * rotation, atol=1e-5, rtol=1e-5)


def test_iso_cts_adds_each_tasks_own_directions_outside_the_common_subspace() -> None:
    base = torch.zeros(4, 4)
    tau1, tau2 = torch.diag(torch.tensor([5.0, 0.0, 1.0, 0.0])), torch.diag(torch.tensor([0.0, 4.0, 0.0, 2.0]))
    experts = torch.stack([tau1, tau2])
    # common subspace: the sum's top 2 directions (e1: 5, e2: 4); task-specific: e3 (1) from task 1, e4 (2)
    # from task 2; spectrum (5, 4, 1, 2) made isotropic at its mean 3
    torch.testing.assert_close(IsoCTS(common_fraction=0.5).merge_tensor(experts, base), 3 * torch.eye(4))
    # with the whole rank common it is Iso-C (the sum diag(5, 4, 1, 2), mean 3, restricted to its support)
    torch.testing.assert_close(
        IsoCTS(common_fraction=1.0).merge_tensor(experts, base), IsoC().merge_tensor(experts, base)
    )
    torch.manual_seed(3)
    vectors = torch.randn(3, 6, 5)
    merged = IsoCTS(common_fraction=0.4).merge_tensor(vectors, torch.zeros(6, 5))
    singular = torch.linalg.svdvals(merged)
    torch.testing.assert_close(singular, singular.mean().expand(5), atol=1e-4, rtol=1e-4)  # isotropic, full rank


# ------------------------------------------------------------------------------------------ Model Stock
def test_model_stock_interpolates_by_the_angle_between_task_vectors() -> None:
    base = torch.tensor([1.0, 1.0])
    tau1 = torch.tensor([1.0, 0.0])
    tau2 = 2 * torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])  # cos θ = 1/2 -> t = 2·½ / (1 + ½)
    experts = torch.stack([base + tau1, base + tau2])
    t = 2 / 3
    torch.testing.assert_close(ModelStock().merge_tensor(experts, base), t * experts.mean(0) + (1 - t) * base)
    orthogonal = torch.stack([base + tau1, base + torch.tensor([0.0, 3.0])])
    torch.testing.assert_close(ModelStock().merge_tensor(orthogonal, base), base)
    same = torch.stack([base + tau1, base + 2 * tau1, base + 3 * tau1])  # cos θ = 1 -> t = 1, the average
    torch.testing.assert_close(ModelStock().merge_tensor(same, base), same.mean(0))


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [
        ("dare_task_arithmetic", {"drop": 1.0}, r"drop must be in \[0.0, 1.0\)"),
        ("dare_ties", {"drop": -0.1}, "drop must be in"),
        ("dare_ties", {"density": 0.0}, "density must be in"),
        ("tsv_m", {"alpha": -1.0}, "alpha must be in"),
        ("iso_c", {"alpha": 0.0}, "alpha must be in"),
        ("iso_cts", {"common_fraction": 1.5}, "common_fraction must be in"),
        ("model_stock", {"scale": 1.0}, "hyper-parameters: none"),
        ("tsv_m", {"rank": 2}, "hyper-parameters: alpha"),
    ],
)
def test_bad_hyper_parameters_are_refused_with_their_name(name: str, hparams: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_rule(name, hparams)


def test_every_rule_on_task_vectors_refuses_experts_without_their_common_start() -> None:
    tasks = [TASKS.get("classification")("cls", num_classes=3), TASKS.get("segmentation")("seg", num_classes=3)]
    torch.manual_seed(0)
    a, b = MultiTaskModel(tiny_backbone, [tasks[0]]), MultiTaskModel(tiny_backbone, [tasks[1]])
    target = MultiTaskModel(tiny_backbone, tasks)
    for name in MERGE_RULES.names():
        rule = make_rule(name)
        if rule.needs_base:
            with pytest.raises(ConfigError, match="common initialisation"):
                merge_states(target, {"cls": a.state_dict(), "seg": b.state_dict()}, rule)


def test_every_weight_rule_merges_real_experts_deterministically_and_keeps_shapes() -> None:
    tasks = [TASKS.get("classification")("cls", num_classes=3), TASKS.get("segmentation")("seg", num_classes=3)]
    torch.manual_seed(0)
    start = MultiTaskModel(tiny_backbone, tasks).state_dict()
    experts = {}
    for i, task in enumerate(tasks):
        model = MultiTaskModel(tiny_backbone, [task])
        model.load_state_dict({k: v for k, v in start.items() if k in model.state_dict()}, strict=False)
        g = torch.Generator().manual_seed(i)
        experts[task.name] = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    target = MultiTaskModel(tiny_backbone, tasks)
    for name in MERGE_RULES.names():
        if make_rule(name).statistics is not None or isinstance(make_rule(name), LearnedRule | WEMoE):
            continue  # rules with data: tests/engine/test_merging_data_rules.py, test_adamerging.py, test_wemoe.py
        first, _ = merge_states(target, experts, make_rule(name), base=start)
        again, _ = merge_states(target, experts, make_rule(name), base=start)
        for key, value in first.items():
            assert value.shape == start[key].shape and torch.isfinite(value).all(), (name, key)
            assert torch.equal(value, again[key]), (name, key)
