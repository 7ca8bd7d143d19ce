"""WEMoE: a routed block against the forward of its explicitly assembled per-sample weights, one-hot and
uniform routing against the expert's and the averaged block, routers' test-time training lowering the
entropy, determinism with a seed, the saved layout rebuilt, and refusals."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from timm.layers import Mlp
from timm.models.resnet import BasicBlock
from torch import nn

from mtlvision.engine.merge import merge_states
from mtlvision.engine.merging import WEMoE, make_rule
from mtlvision.engine.merging.test_time import EntropyObjective
from mtlvision.engine.merging.wemoe import LAYOUT_NAME, rebuild
from mtlvision.errors import ConfigError
from mtlvision.models import MultiTaskModel
from mtlvision.models.backbones import Backbone, BackboneStage
from mtlvision.models.weight_ensembling import (
    RoutedConv2d,
    Routing,
    WeightEnsemblingBlock,
    load_experts,
    upscalable_blocks,
    upscale,
)
from mtlvision.tasks import TASKS
from tests.engine.tinyrun import tiny_model

EXPERTS = 3


def _residual_block(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
    block = BasicBlock(4, 6, stride=2, downsample=down)
    for module in block.modules():  # non-trivial statistics and affine weights
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return block.eval()


def _perturbed(block: nn.Module, seed: int) -> nn.Module:
    other = copy.deepcopy(block)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return other


def _upscaled(block: nn.Module, experts: list[nn.Module], hidden_layers: int = 2) -> WeightEnsemblingBlock:
    holder = nn.Module()
    holder.block = copy.deepcopy(block)
    upscale(holder, ["block"], len(experts), hidden_layers)
    base = {f"block.{k}": v for k, v in block.named_parameters()}
    states = [dict(e.named_parameters()) for e in experts]
    vectors = {f"block.{k}": torch.stack([s[k] for s in states]) - v for k, v in block.named_parameters()}
    load_experts(
        holder, ["block"], {k: v.detach() for k, v in base.items()}, {k: v.detach() for k, v in vectors.items()}
    )
    routed = holder.block
    assert isinstance(routed, WeightEnsemblingBlock)
    return routed.eval()


def _assembled(block: nn.Module, experts: list[nn.Module], weights: torch.Tensor) -> nn.Module:
    """The block with its weights θ_0 + Σ_t w_t τ_t written out."""
    out = copy.deepcopy(block)
    states = [dict(e.named_parameters()) for e in experts]
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.add_(sum(w * (s[name] - p) for w, s in zip(weights, states)))
    return out


@pytest.fixture
def residual() -> tuple[nn.Module, list[nn.Module]]:
    block = _residual_block(0)
    return block, [_perturbed(block, s) for s in range(1, EXPERTS + 1)]


def test_routed_residual_block_equals_each_samples_assembled_weights(residual) -> None:
    block, experts = residual
    routed = _upscaled(block, experts)
    with torch.no_grad():  # routing weights that differ per sample and from the initial 0.3
        for p in routed.router.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        r = routed.routes(x)
        got = routed(x)
        want = torch.cat([_assembled(block, experts, r[b])(x[b : b + 1]) for b in range(len(x))])
    assert r.shape == (5, EXPERTS) and not torch.allclose(r[0], r[1])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_router_is_per_position_then_averaged_and_starts_at_the_scale(residual) -> None:
    block, experts = residual
    routed = _upscaled(block, experts)
    x = torch.randn(2, 4, 3, 3)
    tokens = x.flatten(2).transpose(1, 2)
    router = routed.router
    assert router.hidden is not None and router.out is not None
    direct = router.out(torch.relu(router.hidden(tokens))).mean(1)
    torch.testing.assert_close(routed.routes(x), direct)
    assert torch.equal(router.out.bias, torch.full((EXPERTS,), 0.3)) and float(router.out.weight.detach().std()) < 0.02


@pytest.mark.parametrize("which", [0, 2])
def test_one_hot_routing_is_the_expert_and_uniform_routing_the_average(residual, which: int) -> None:
    block, experts = residual
    routed = _upscaled(block, experts, hidden_layers=0)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert routed.router.constant is not None
    with torch.no_grad():
        routed.router.constant.copy_(torch.nn.functional.one_hot(torch.tensor(which), EXPERTS).float())
        torch.testing.assert_close(routed(x), experts[which](x), atol=1e-5, rtol=1e-5)
        routed.router.constant.fill_(1 / EXPERTS)
        average = copy.deepcopy(block)
        for name, p in average.named_parameters():
            p.copy_(torch.stack([dict(e.named_parameters())[name] for e in experts]).mean(0))
        torch.testing.assert_close(routed(x), average(x), atol=1e-5, rtol=1e-5)


def test_routed_grouped_convolution_and_per_token_mlp_equal_their_assembled_weights() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    routing = Routing()
    layer = RoutedConv2d(conv, 2, routing)
    with torch.no_grad():
        layer.vectors.normal_()
        assert layer.bias_vectors is not None
        layer.bias_vectors.normal_()
    x, r = torch.randn(3, 4, 5, 5), torch.rand(3, 2)
    routing.weights = r
    want = torch.cat(
        [
            nn.functional.conv2d(
                x[b : b + 1],
                conv.weight + torch.tensordot(r[b], layer.vectors, 1),
                conv.bias + r[b] @ layer.bias_vectors,
                padding=1,
                groups=2,
            )
            for b in range(3)
        ]
    )
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)

    mlp = Mlp(8, 16)
    experts = [_perturbed(mlp, s) for s in (1, 2)]
    routed = _upscaled(mlp, experts)
    tokens = torch.randn(2, 5, 8)
    with torch.no_grad():
        r = routed.routes(tokens)
        want = torch.cat([_assembled(mlp, experts, r[b])(tokens[b : b + 1]) for b in range(2)])
        torch.testing.assert_close(routed(tokens), want, atol=1e-5, rtol=1e-5)


def _block_backbone() -> Backbone:
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    stages = [
        BackboneStage(0, OrderedDict(conv=nn.Conv2d(3, 8, 3, stride=2, padding=1), act=nn.ReLU())),
        BackboneStage(1, OrderedDict(block=BasicBlock(8, 16, stride=2, downsample=down))),
    ]
    return Backbone("tiny-residual", stages, [8, 16], [2, 4], {})


def _block_model(seed: int) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(_block_backbone, [TASKS.get("classification")("cls", num_classes=3)])


def _merged_wemoe(rule: WEMoE) -> tuple[MultiTaskModel, dict[str, torch.Tensor]]:
    start = _block_model(0).state_dict()
    experts = {}
    for task in ("a", "b"):
        state = _block_model(0).state_dict()
        g = torch.Generator().manual_seed(len(task) + ord(task))
        experts[task] = {
            k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()
        }
    model = _block_model(1)
    state, report = merge_states(model, experts, rule.arithmetic(), start)
    model.load_state_dict(state)
    rule.upscale(model, experts, start, report.merged)
    return model, start


def test_routers_learnt_on_unlabelled_images_lower_the_entropy_deterministically() -> None:
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    learnt = []
    for _ in range(2):
        rule = WEMoE(steps=15, lr=0.05, batch_size=8, seed=4)
        model, _ = _merged_wemoe(rule)
        assert rule.blocks == ["architecture.backbone.stages.1.block"]
        objective = EntropyObjective(model, images, batch_size=8, batches=1, seed=rule.seed)
        rule.learn_routers(model, objective)
        assert rule.learned["objective_last_step"] < rule.learned["objective_first_step"]
        (routing,) = rule.learned["mean_routing_per_block"].values()
        assert len(routing) == 2 and routing != [0.3, 0.3]  # moved from the initial λ
        learnt.append({k: v.clone() for k, v in model.state_dict().items() if ".router." in k})
    assert learnt[0].keys() and all(torch.equal(learnt[0][k], learnt[1][k]) for k in learnt[0])


def test_the_upscaled_model_holds_every_task_vector_and_its_layout_rebuilds_it(tmp_path) -> None:
    rule = WEMoE(steps=1)
    model, start = _merged_wemoe(rule)
    block = model.get_submodule(rule.blocks[0])
    assert isinstance(block, WeightEnsemblingBlock)
    conv = block.block.conv1
    assert isinstance(conv, RoutedConv2d) and conv.vectors.shape[0] == 2
    torch.testing.assert_close(conv.layer.weight, start[f"{rule.blocks[0]}.conv1.weight"])
    plain = sum(p.numel() for p in _block_model(0).parameters())
    in_block = sum(p.numel() for p in _block_model(0).get_submodule(rule.blocks[0]).parameters())
    router = sum(p.numel() for p in block.router.parameters())
    assert sum(p.numel() for p in model.parameters()) == plain + 2 * in_block + router  # θ_0, 2 task vectors
    (tmp_path / LAYOUT_NAME).write_text(json.dumps(rule.layout(2)))
    again = _block_model(5)
    rebuild(again, tmp_path)
    again.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x)["cls"], model.eval()(x)["cls"])
    rebuild(plain_model := _block_model(0), tmp_path / "elsewhere")  # no layout: nothing changes
    assert not upscalable_blocks(plain_model, set()) and not any(
        isinstance(m, WeightEnsemblingBlock) for m in plain_model.modules()
    )


def test_refusals_name_the_problem(tmp_path) -> None:
    with pytest.raises(ConfigError, match="changes the model"):
        make_rule("wemoe").merge({"w": torch.zeros(2, 1)}, {"w": torch.zeros(1)})
    for bad in ({"hidden_layers": 3}, {"steps": 0}, {"scale": 1.5}, {"split": "holdout"}, {"lr": 0.0}):
        with pytest.raises(ConfigError, match=f"wemoe: {next(iter(bad))}"):
            make_rule("wemoe", bad)
    model = tiny_model()  # plain convolutions, no residual block
    state = model.state_dict()
    rule = WEMoE()
    with pytest.raises(ConfigError, match="no block to upscale"):
        rule.upscale(model, {"a": state, "b": state}, state, [k for k, _ in model.named_parameters()])
    (tmp_path / LAYOUT_NAME).write_text('{"blocks": ["architecture.nowhere"], "experts": 2}')
    with pytest.raises(ConfigError, match="hidden_layers"):
        rebuild(_block_model(0), tmp_path)
    (tmp_path / LAYOUT_NAME).write_text('{"blocks": ["architecture.nowhere"], "experts": 2, "hidden_layers": 2}')
    with pytest.raises(ConfigError, match="not in the run's model"):
        rebuild(_block_model(0), tmp_path)


@pytest.mark.slow
def test_the_routed_model_exports_to_onnx_and_onnxruntime_reproduces_it(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from mtlvision.export import export_onnx

    rule = WEMoE(steps=1)
    model, _ = _merged_wemoe(rule)
    with torch.no_grad():  # routing that differs per sample
        for name, p in model.named_parameters():
            if ".router." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    report = export_onnx(model.eval(), tmp_path / "wemoe.onnx", (16, 16), check_batch=3)
    assert report.outputs == ["cls"] and report.max_abs_difference < 1e-4
