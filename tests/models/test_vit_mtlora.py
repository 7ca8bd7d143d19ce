"""ViT backbones with ViTDet's simple feature pyramid, and MTLoRA over them: shapes, the paper's parameter
counts, identity at initialisation, merging into plain weights, sharing, errors, a scenes run with export."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures import HPS, MTAN, MTLoRA, RepresentationUnavailable
from mtlvision.models.architectures.mtlora import LoRALinear, MTLoRANetwork
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import Backbone, create_backbone
from mtlvision.models.vit import ViTBackbone
from tests.models.tiny_scenes import TINY_SCENES

VIT = "test_vit"  # timm's test ViT: width 64, 6 blocks, MLP width 192, patch 16, one class token
TASKS = ["seg", "depth", "cls"]


@pytest.fixture(scope="module")
def factory() -> Callable[[], Backbone]:
    torch.manual_seed(0)
    prototype = create_backbone(VIT)
    return lambda: copy.deepcopy(prototype)


def randomise_adapters(module: nn.Module, std: float = 0.05) -> None:
    """Non-zero B matrices, so that every adapter changes its layer."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=generator) * std)


# ------------------------------------------------------------------------------------------- backbone
def test_vit_backbone_is_a_feature_pyramid_of_the_last_map(factory) -> None:
    backbone = factory().eval()
    assert isinstance(backbone, ViTBackbone)
    assert backbone.feature_strides == [4, 8, 16, 32] and backbone.feature_channels == [64] * 4
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = backbone(images)
        vit_map = backbone.stages[0](images)
        tokens = backbone.trunk.model.forward_features(images)  # timm's own forward, independent of ours
    assert [tuple(f.shape) for f in features] == [(2, 64, 16, 24), (2, 64, 8, 12), (2, 64, 4, 6), (2, 64, 2, 3)]
    expected = tokens[:, 1:].transpose(1, 2).reshape(2, 64, 4, 6)
    torch.testing.assert_close(vit_map, expected)
    # the identity level is the projected ViT map itself, the coarsest its max-pool
    torch.testing.assert_close(features[2], backbone.pyramid.projections[2](vit_map))
    pooled = torch.nn.functional.max_pool2d(vit_map, 2)
    torch.testing.assert_close(features[3], backbone.pyramid.projections[3](pooled))


def test_vit_backbone_errors_name_the_cause(factory) -> None:
    with pytest.raises(ConfigError, match="multiples of 16"):
        factory()(torch.randn(1, 3, 40, 48))
    with pytest.raises(ConfigError, match="chain of backbone stages"):
        MTAN().build(factory, TASKS)


def test_vit_loads_a_local_timm_checkpoint(factory, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = timm.create_model(VIT, pretrained=False, num_classes=5)
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.warns(UserWarning, match="pyramid"):
        report = create_backbone(VIT, pretrained=tmp_path / "vit.safetensors").load_pretrained(
            tmp_path / "vit.safetensors"
        )
    assert report.unexpected == ["head.bias", "head.weight"]
    assert all(key.startswith("pyramid.") for key in report.missing)
    with pytest.warns(UserWarning):
        backbone = create_backbone(VIT, pretrained=tmp_path / "vit.safetensors")
    own = backbone.trunk.model.state_dict()
    for key, tensor in reference.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(own[key], tensor)


# --------------------------------------------------------------------------------------------- MTLoRA
def adapter_count(backbone: ViTBackbone, spec: MTLoRA, num_tasks: int) -> int:
    """The paper's count: ``r (i + o)`` per adapted ``Linear(i, o)``; a block's qkv (d→3d), proj (d→d), fc1
    (d→h) and fc2 (h→d) sum to ``8d + 2h``."""
    model = backbone.trunk.model
    d, h, depth = model.embed_dim, model.blocks[0].mlp.fc1.out_features, len(model.blocks)
    per_block = 8 * d + 2 * h
    shared_blocks = depth - spec.task_blocks
    return per_block * (shared_blocks * spec.rank + spec.task_blocks * num_tasks * spec.task_rank)


@pytest.mark.parametrize(
    "spec", [MTLoRA(), MTLoRA(rank=8, task_rank=2, task_blocks=3), MTLoRA(rank=2, task_rank=16, task_blocks=6)]
)
def test_trainable_parameters_follow_the_formula(factory, spec: MTLoRA) -> None:
    built = spec.build(factory, TASKS)
    assert isinstance(built, MTLoRANetwork)
    adapters = sum(p.numel() for m in built.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b))
    assert (
        adapters
        == adapter_count(built.backbone, spec, len(TASKS))
        == 896 * ((6 - spec.task_blocks) * spec.rank + spec.task_blocks * 3 * spec.task_rank)
    )
    pyramid = sum(p.numel() for p in built.backbone.pyramid.parameters())
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert trainable == adapters + pyramid
    assert not any(p.requires_grad for p in built.backbone.stages.parameters())
    unfrozen = MTLoRA(freeze_backbone=False).build(factory, TASKS)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_zero_b_is_the_base_network(factory) -> None:
    """B starts at zero (LoRA's initialisation): MTLoRA computes exactly the base ViT + pyramid (HPS)."""
    torch.manual_seed(0)
    backbone = factory()
    images = torch.randn(2, 3, 32, 48)
    adapted = MTLoRA(task_blocks=2).build(lambda: copy.deepcopy(backbone), TASKS).eval()
    plain = HPS().build(lambda: copy.deepcopy(backbone), TASKS).eval()
    with torch.no_grad():
        out, expected = adapted(images), plain(images)
    for name in TASKS:
        for a, b in zip(out[name], expected[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_merged_weights_compute_the_same_outputs(factory) -> None:
    built = MTLoRA(task_blocks=2).build(factory, TASKS).eval()
    randomise_adapters(built)
    images = torch.randn(2, 3, 32, 32)
    merged = built.merged().eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        out, again = built(images), merged(images)
    assert not torch.allclose(out["seg"][0], out["depth"][0], atol=1e-3)  # the task adapters differ
    for name in TASKS:
        for a, b in zip(out[name], again[name]):
            assert (a - b).abs().max().item() <= 1e-5
    # the original keeps its adapters: merging copies
    assert any(isinstance(m, LoRALinear) for m in built.modules())


def test_task_adapters_are_task_specific_and_the_rest_shared(factory) -> None:
    built = MTLoRA(task_blocks=2).build(factory, TASKS)
    randomise_adapters(built)
    shared = {id(p) for p in built.shared_parameters()}
    for name in TASKS:
        own = list(built.task_adapter_parameters(name))
        assert len(own) == 2 * 2 * 4 and not shared & {id(p) for p in own}
    out = built(torch.randn(2, 3, 32, 32))
    loss = sum(f.square().mean() for f in out["seg"])
    loss.backward()
    for name in TASKS:
        grads = [p.grad for p in built.task_adapter_parameters(name)]
        assert all((g is not None) == (name == "seg") for g in grads), name
    # the shared (task-agnostic) adapters learn from the task's loss too
    first = built.shared_blocks[0].attn.qkv
    assert isinstance(first, LoRALinear) and first.lora_b.grad is not None and first.lora_b.grad.abs().sum() > 0


def test_representation_mode_is_refused_because_shared_weights_follow_the_adapters(factory) -> None:
    built = MTLoRA().build(factory, TASKS)
    with pytest.raises(RepresentationUnavailable, match="task blocks' base weights and the feature pyramid"):
        built.encode(torch.randn(1, 3, 48, 32))


def test_mtlora_errors_name_the_field(factory) -> None:
    assert "Agiza" in ARCHITECTURES.entry("mtlora").citation
    with pytest.raises(ConfigError, match="task_blocks=7 exceeds the 6 blocks"):
        MTLoRA(task_blocks=7).build(factory, TASKS)
    with pytest.raises(ConfigError, match="rank=0"):
        MTLoRA(rank=0)
    with pytest.raises(ConfigError, match="task_scale"):
        MTLoRA(task_scale=-1.0)
    with pytest.raises(ConfigError, match="needs a timm ViT backbone"):
        MTLoRA().build(lambda: create_backbone("test_resnet"), TASKS)


@pytest.mark.slow
def test_scenes_trains_and_exports_with_merged_adapters(tmp_path: Path) -> None:
    """The scenes preset end to end at a tiny size; metrics.json records the trainable parameters and the
    ONNX graph (adapters merged) matches the PyTorch model."""
    from mtlvision import api
    from mtlvision.engine.build import load_model

    overrides = {
        **TINY_SCENES,
        "model.backbone": VIT,
        "model.architecture": {"name": "mtlora", "task_blocks": 2},
        "tasks": ["count", "segmentation"],
    }
    run = api.train("scenes", overrides, out=tmp_path, name="mtlora")
    counts = json.loads((run.path / "metrics.json").read_text())["model"]["parameters"]
    model, _ = load_model(run.path)
    architecture = model.architecture
    assert isinstance(architecture, MTLoRANetwork)
    pyramid = sum(p.numel() for p in architecture.backbone.pyramid.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    adapters = adapter_count(architecture.backbone, MTLoRA(task_blocks=2), num_tasks=2)
    assert counts["trainable"] == adapters + pyramid + heads < counts["total"]
    report = api.export(run.path)
    assert report.max_abs_difference < 1e-4
