"""Merging rules that need data: Fisher merging and RegMean on hand-made weights and statistics whose merge is
computed here independently, and the statistics themselves (Fisher diagonals, input Gram matrices) checked
against direct computations on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlvision.data.collate import collate
from mtlvision.engine.merge import merge_states
from mtlvision.engine.merging import FisherMerging, RegMean, make_rule
from mtlvision.engine.merging.statistics import collect_statistics, fisher_diagonal, input_grams
from mtlvision.errors import ConfigError
from mtlvision.models import MultiTaskModel
from tests.engine.tinyrun import TinyScenes, tiny_backbone, tiny_model, tiny_tasks

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- Fisher
def test_fisher_merging_weights_each_entry_by_the_experts_fisher() -> None:
    experts = {"w": torch.tensor([[1.0, 2.0, 5.0], [3.0, -2.0, 1.0]])}
    fisher = {"w": torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])}
    merged = FisherMerging(floor=1e-6).merge(experts, None, fisher)["w"]
    # (1·1 + 3·3)/4, both at the floor: the plain mean, equal Fishers: the plain mean
    torch.testing.assert_close(merged, torch.tensor([2.5, 0.0, 3.0]))


def test_fisher_normalised_ignores_the_scale_of_each_experts_loss() -> None:
    torch.manual_seed(0)
    experts = {"a": torch.randn(2, 4, 3), "b": torch.randn(2, 5)}
    fisher = {"a": torch.rand(2, 4, 3), "b": torch.rand(2, 5)}
    scaled = {k: v * torch.tensor([1.0, 250.0]).view(-1, *[1] * (v.dim() - 1)) for k, v in fisher.items()}
    rule = FisherMerging(normalize=True)
    plain, rescaled = rule.merge(experts, None, fisher), rule.merge(experts, None, scaled)
    for key in experts:
        torch.testing.assert_close(plain[key], rescaled[key])
    with pytest.raises(ConfigError, match="needs each expert's Fisher"):
        rule.merge(experts, None, None)


def _batch(n: int = 6) -> dict:
    data = TinyScenes(n)
    return collate([data[i] for i in range(n)], {t.name: t for t in tiny_tasks()})


def test_fisher_diagonal_is_the_mean_squared_per_sample_gradient() -> None:
    model = tiny_model(0).eval()
    names = ["architecture.backbone.stages.1.conv.weight", "heads.cls.mlp.3.weight"]
    batch = _batch(4)
    fisher = fisher_diagonal(model, [batch], names, samples=3, device=CPU)
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(3):
        model.zero_grad()
        predictions = model(batch["image"][i : i + 1])
        loss = sum(
            task.loss(
                predictions[name],
                batch["targets"][name][i : i + 1],
                batch["valid"][name][i : i + 1],
            )
            for name, task in model.tasks.items()
        )
        loss.backward()
        for n in names:
            expected[n] += params[n].grad ** 2 / 3
    for n in names:
        torch.testing.assert_close(fisher[n], expected[n])


# --------------------------------------------------------------------------------------------- RegMean
def test_regmean_on_disjoint_inputs_keeps_each_experts_weights_where_its_inputs_live() -> None:
    weights = torch.tensor([[[1.0, 2.0]], [[5.0, -3.0]]])  # two experts, a linear 2 -> 1
    grams = torch.stack([torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0]))])
    merged = RegMean(alpha=1.0).merge({"w": weights}, None, {"w": grams})["w"]
    torch.testing.assert_close(merged, torch.tensor([[1.0, -3.0]]))


def test_regmean_keeps_the_mean_weight_on_inputs_no_sample_reaches() -> None:
    weights = torch.tensor([[[1.0, 2.0, 4.0]], [[3.0, -2.0, 0.0]]])
    grams = torch.stack([torch.diag(torch.tensor([1.0, 0.0, 0.0])), torch.diag(torch.tensor([1.0, 2.0, 0.0]))])
    merged = RegMean(alpha=0.5).merge({"w": weights}, None, {"w": grams})["w"]
    # dim 0: (1·1 + 1·3)/2; dim 1: only expert 2 sees it; dim 2: no one does, the mean (4 + 0)/2
    torch.testing.assert_close(merged, torch.tensor([[2.0, -2.0, 2.0]]))


def test_regmean_with_alpha_one_is_the_least_squares_fit_to_every_experts_outputs() -> None:
    torch.manual_seed(1)
    inputs = [torch.randn(30, 4), torch.randn(20, 4) * 2 + 1]
    weights = torch.randn(2, 3, 4)
    grams = torch.stack([x.T @ x for x in inputs])
    merged = RegMean(alpha=1.0).merge({"w": weights, "b": torch.randn(2, 3)}, None, {"w": grams})
    # independent: min_W Σ_t ||X_t Wᵀ − X_t W_tᵀ||² by least squares on the stacked data
    stacked_x = torch.cat(inputs).double()
    stacked_y = torch.cat([x @ w.T for x, w in zip(inputs, weights)]).double()
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T.float()
    torch.testing.assert_close(merged["w"], expected, atol=1e-4, rtol=1e-4)
    assert merged["b"].shape == (3,)
    # α < 1 shrinks the off-diagonal entries; α = 0 is a per-input-dimension weighted mean of the experts
    diag = RegMean(alpha=0.0).merge({"w": weights}, None, {"w": grams})["w"]
    d = torch.diagonal(grams, dim1=1, dim2=2)  # [T, in]
    torch.testing.assert_close(diag, (d[:, None, :] * weights).sum(0) / d.sum(0), atol=1e-5, rtol=1e-5)


def test_input_grams_of_a_convolution_give_its_output_energy() -> None:
    torch.manual_seed(2)
    model = tiny_model(0).eval()
    key = "architecture.backbone.stages.1.conv.weight"
    conv = dict(model.named_modules())[key[: -len(".weight")]]
    assert isinstance(conv, nn.Conv2d)
    batch = _batch(5)
    grams = input_grams(model, [batch], [key, "heads.cls.mlp.3.bias"], samples=5, device=CPU)
    assert set(grams) == {key}
    captured = []
    handle = conv.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.no_grad():
        model(batch["image"])
    handle.remove()
    weight = torch.randn_like(conv.weight)
    out = nn.functional.conv2d(captured[0], weight, None, conv.stride, conv.padding)
    rows = out.shape[0] * out.shape[2] * out.shape[3]
    energy = torch.einsum("od,de,oe->", weight.flatten(1), grams[key], weight.flatten(1)) * rows
    torch.testing.assert_close(energy, (out**2).sum(), rtol=1e-4, atol=1e-3)


def test_rules_with_data_refuse_to_merge_without_statistics_and_merge_real_experts_with_them() -> None:
    tasks = tiny_tasks()[:2]
    torch.manual_seed(0)
    experts = {t.name: MultiTaskModel(tiny_backbone, [t]).eval() for t in tasks}
    target = MultiTaskModel(tiny_backbone, tasks)
    states = {name: m.state_dict() for name, m in experts.items()}
    with pytest.raises(ConfigError, match="needs data statistics \\(gram\\)"):
        merge_states(target, states, RegMean())
    batches = [_batch(4)]
    for name in ("regmean", "fisher"):
        rule = make_rule(name, {"samples": 4})

        def gather(names, kind=rule.statistics):
            return collect_statistics(kind, {n: (m, batches) for n, m in experts.items()}, names, 4, CPU)

        state, report = merge_states(target, states, rule, statistics=gather)
        assert report.merged and all(torch.isfinite(state[k]).all() for k in report.merged)
    with pytest.raises(ConfigError, match="samples must be a whole number"):
        make_rule("regmean", {"samples": 0})
    with pytest.raises(ConfigError, match="samples must be a whole number"):
        make_rule("fisher", {"samples": 2.5})
    with pytest.raises(ConfigError, match="alpha must be in"):
        make_rule("regmean", {"alpha": 1.5})
