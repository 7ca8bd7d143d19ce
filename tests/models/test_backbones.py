"""Backbones: stage splits reproduce timm/torchvision features; local pretrained weights; freezing."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.feature_extraction import create_feature_extractor

from mtlvision.errors import CheckpointError, ConfigError, UnknownNameError
from mtlvision.models.backbones import BACKBONES, NATIVE_BACKBONES, TORCHVISION_PREFIX, create_backbone

IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _copy_in_order(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every tensor of ``source`` into ``target`` position by position (names differ, order must not)."""
    source_state, target_state = source.state_dict(), target.state_dict()
    assert len(source_state) == len(target_state)
    copied = {}
    for (source_key, value), (target_key, own) in zip(source_state.items(), target_state.items()):
        assert value.shape == own.shape, (source_key, target_key)
        copied[target_key] = value
    target.load_state_dict(copied)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "mobilenetv3_small_050", "regnetx_002"])
def test_stage_split_reproduces_timm_features_only(name: str) -> None:
    reference = timm.create_model(name, pretrained=False, features_only=True).eval()
    backbone = create_backbone(name).eval()
    _copy_in_order(reference, backbone)
    with torch.no_grad():
        expected = reference(IMAGES)
        got = backbone(IMAGES)
    assert len(got) == len(expected) == len(backbone.stages)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs)
    assert backbone.feature_channels == reference.feature_info.channels()
    assert backbone.feature_strides == reference.feature_info.reduction()


@pytest.mark.parametrize("name", ["resnet18", "tv/resnet18", "tv/mobilenet_v3_small", "tv/regnet_y_400mf"])
def test_channels_and_strides_describe_the_outputs(name: str) -> None:
    backbone = create_backbone(name).eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, 64, 96))
    assert [f.shape[1] for f in features] == backbone.feature_channels
    assert [64 // f.shape[-2] for f in features] == backbone.feature_strides
    assert [96 // f.shape[-1] for f in features] == backbone.feature_strides
    assert backbone.feature_strides == sorted(backbone.feature_strides)


def test_in_chans_is_passed_to_timm() -> None:
    backbone = create_backbone("resnet18", in_chans=1)
    assert backbone(torch.rand(2, 1, 32, 32))[-1].shape == (2, 512, 1, 1)


def test_torchvision_resnet_loads_its_own_checkpoint_and_matches_torchvision(tmp_path) -> None:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18_tv.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = create_backbone("tv/resnet18", pretrained=str(path)).eval()
    nodes = {"relu": "s2", "layer1": "s4", "layer2": "s8", "layer3": "s16", "layer4": "s32"}
    reference = create_feature_extractor(model, return_nodes=nodes)
    with torch.no_grad():
        expected = list(reference(IMAGES).values())
        got = backbone(IMAGES)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_torchvision_features_model_ends_where_its_features_end(tmp_path) -> None:
    torch.manual_seed(2)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    path = tmp_path / "mnv3.pth"
    torch.save({"state_dict": model.state_dict()}, path)  # a wrapped .pth as training scripts save it
    backbone = create_backbone("tv/mobilenet_v3_small", pretrained=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(IMAGES)[-1], model.features(IMAGES))


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_timm_checkpoint_reproduces_the_plain_timm_model(tmp_path, name: str) -> None:
    torch.manual_seed(3)
    model = timm.create_model(name, pretrained=False).eval()
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = create_backbone(name, pretrained=str(path)).eval()
    with torch.no_grad():
        expected = model.forward_intermediates(IMAGES, intermediates_only=True)
        got = backbone(IMAGES)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_torchvision_resnet_weights_load_into_the_timm_resnet(tmp_path) -> None:
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "tv.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = create_backbone("resnet18")
    report = backbone.load_pretrained(path)
    assert report.missing == []
    assert report.unexpected == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(backbone.stages[4].layer4[1].conv2.weight, model.layer4[1].conv2.weight)


def test_partial_checkpoint_warns_and_names_what_is_missing(tmp_path) -> None:
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    kept = {k: v.contiguous() for k, v in state.items() if not k.startswith("layer4")}
    path = tmp_path / "partial.safetensors"
    save_file(kept, str(path))
    with pytest.warns(UserWarning, match="layer4"):
        report = create_backbone("resnet18").load_pretrained(path)
    assert report.missing and all(k.startswith("layer4") for k in report.missing)
    assert report.loaded == len([k for k in kept if not k.startswith("fc")])


def test_unrelated_checkpoint_is_refused(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="none of its 2 tensors"):
        create_backbone("resnet18", pretrained=str(path))


def test_checkpoint_of_another_variant_is_refused(tmp_path) -> None:
    path = tmp_path / "wide.safetensors"
    save_file({"conv1.weight": torch.zeros(32, 3, 7, 7)}, str(path))
    with pytest.raises(CheckpointError, match="do not fit"):
        create_backbone("resnet18", pretrained=str(path))


class _Pickled:
    """An arbitrary object: loading it would run unpickling code, which weights_only refuses."""


def test_missing_and_unsafe_files_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        create_backbone("resnet18", pretrained=str(tmp_path / "nope.pth"))
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"conv1.weight": torch.zeros(1), "hook": _Pickled()}, unsafe)
    with pytest.raises(CheckpointError, match="cannot read"):
        create_backbone("resnet18", pretrained=str(unsafe))


def test_unknown_names_suggest_close_ones() -> None:
    with pytest.raises(UnknownNameError, match="resnet18"):
        create_backbone("resnet_18")
    with pytest.raises(UnknownNameError, match="tv/resnet18"):
        create_backbone("tv/resnet19")


def test_backbone_without_stage_chain_gets_a_clear_error() -> None:
    # plain ViTs get a feature pyramid (tests/models/test_vit_mtlora.py); a relative-position ViT does not
    with pytest.raises(ConfigError, match="cannot be split into stages|cannot build it"):
        create_backbone("test_vit_relpos")


def test_recommended_backbones_exist() -> None:
    torchvision_names = set(torchvision.models.list_models(module=torchvision.models))
    for name in BACKBONES.names():
        if name in NATIVE_BACKBONES.names():  # built by mtlvision itself (SegNet)
            assert create_backbone(name).feature_channels
        elif name.startswith(TORCHVISION_PREFIX):
            assert name[len(TORCHVISION_PREFIX) :] in torchvision_names
        else:
            assert timm.is_model(name)


def test_freeze_stages_stops_gradients_and_batch_norm_updates() -> None:
    backbone = create_backbone("resnet18")
    backbone.freeze_stages(2)
    backbone.train()
    frozen_bn = backbone.stages[0].bn1
    trainable_bn = backbone.stages[2].layer2[0].bn1
    before = frozen_bn.running_mean.clone(), trainable_bn.running_mean.clone()
    backbone(torch.rand(2, 3, 32, 32))[-1].sum().backward()
    assert not frozen_bn.training and trainable_bn.training
    torch.testing.assert_close(frozen_bn.running_mean, before[0])
    assert not torch.equal(trainable_bn.running_mean, before[1])
    for index, stage in enumerate(backbone.stages):
        for parameter in stage.parameters():
            assert parameter.requires_grad == (index >= 2)
            assert (parameter.grad is None) == (index < 2)
    backbone.freeze_stages(0)
    backbone.train()
    assert all(p.requires_grad for p in backbone.parameters()) and frozen_bn.training
    with pytest.raises(ConfigError, match="out of range"):
        backbone.freeze_stages(6)


def test_rgb_checkpoint_adapts_to_a_grey_backbone(tmp_path) -> None:
    model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = create_backbone("resnet18", pretrained=str(path), in_chans=1)
    torch.testing.assert_close(backbone.stages[0].conv1.weight, model.conv1.weight.sum(dim=1, keepdim=True))
