"""Heads: output shapes at any image size, which scales they read, gradients, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlvision.errors import ConfigError, UnknownNameError
from mtlvision.models.heads import HEADS, ASPPHead, FPNHead, build_head

# channel counts scaled down from ResNet / ConvNeXt / VGG to keep the tests fast; the strides are theirs
RESNET = ([8, 8, 16, 32, 64], [2, 4, 8, 16, 32])
CONVNEXT = ([8, 16, 32, 64], [4, 8, 16, 32])
VGG = ([8, 16, 32, 32], [1, 2, 4, 8])


def features_for(layout: tuple[list[int], list[int]], height: int, width: int, batch: int = 2) -> list[torch.Tensor]:
    """Random feature maps shaped as a strided backbone gives them (ceil division, as padded convs do)."""
    channels, strides = layout
    return [torch.randn(batch, c, math.ceil(height / s), math.ceil(width / s)) for c, s in zip(channels, strides)]


@pytest.mark.parametrize("layout", [RESNET, CONVNEXT, VGG])
@pytest.mark.parametrize("name", ["fpn", "aspp"])
def test_dense_heads_predict_at_the_image_size(name: str, layout) -> None:
    head = build_head({"name": name, "channels": 16}, *layout, out_channels=5)
    assert head(features_for(layout, 33, 47), (33, 47)).shape == (2, 5, 33, 47)


@pytest.mark.parametrize("name", ["mlp", "linear"])
def test_image_heads_predict_one_vector_per_image(name: str) -> None:
    head = build_head(name, *RESNET, out_channels=7)
    assert head(features_for(RESNET, 33, 47), (33, 47)).shape == (2, 7)


@settings(max_examples=12, deadline=None)
@given(height=st.integers(9, 80), width=st.integers(9, 80), name=st.sampled_from(["fpn", "aspp"]))
def test_dense_heads_any_size(height: int, width: int, name: str) -> None:
    head = build_head({"name": name, "channels": 8}, *RESNET, out_channels=3).eval()
    with torch.no_grad():
        assert head(features_for(RESNET, height, width, batch=1), (height, width)).shape == (1, 3, height, width)


SMALL = {
    "fpn": {"channels": 16},
    "aspp": {"channels": 16},
    "mlp": {"hidden": 16},
    "linear": {},
    "segnet": {},
    "deeplabv3": {},
}


@pytest.mark.parametrize("name", sorted(HEADS.names()))
def test_every_head_parameter_receives_a_gradient(name: str) -> None:
    head = build_head({"name": name, **SMALL[name]}, *RESNET, out_channels=4)
    head(features_for(RESNET, 64, 64), (64, 64)).square().mean().backward()
    for parameter_name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name


def _sensitivity(head: torch.nn.Module, layout, index: int) -> float:
    """How much the head's output moves when feature map ``index`` alone is perturbed."""
    features = features_for(layout, 64, 64)
    with torch.no_grad():
        base = head(features, (64, 64))
        features[index] = features[index] + torch.randn_like(features[index])
        return float((head(features, (64, 64)) - base).abs().max())


def test_fpn_reads_every_scale_from_stride_4_and_skips_stride_2() -> None:
    head = FPNHead(*RESNET, out_channels=3, channels=16).eval()
    assert _sensitivity(head, RESNET, 0) == 0.0
    for index in range(1, 5):
        assert _sensitivity(head, RESNET, index) > 0.0


def test_aspp_reads_the_coarsest_scale_and_the_stride_4_skip_only() -> None:
    head = ASPPHead(*RESNET, out_channels=3, channels=16).eval()
    assert [_sensitivity(head, RESNET, i) > 0.0 for i in range(5)] == [False, True, False, False, True]


def test_deeplabv3_reads_the_coarsest_scale_only_and_checks_its_rates() -> None:
    head = build_head("deeplabv3", *RESNET, out_channels=3).eval()
    assert [_sensitivity(head, RESNET, i) > 0.0 for i in range(5)] == [False, False, False, False, True]
    assert head(features_for(RESNET, 33, 47), (33, 47)).shape == (2, 3, 33, 47)
    with pytest.raises(ConfigError, match="atrous_rates"):
        build_head({"name": "deeplabv3", "atrous_rates": [6, 12]}, *RESNET, out_channels=3)


def test_image_heads_read_the_pooled_coarsest_scale() -> None:
    head = build_head("linear", *RESNET, out_channels=3)
    features = features_for(RESNET, 64, 64)
    pooled = features[-1].mean(dim=(2, 3))
    torch.testing.assert_close(head(features, (64, 64)), head.linear(pooled))
    assert _sensitivity(head, RESNET, 3) == 0.0


def test_head_errors_name_the_problem() -> None:
    with pytest.raises(UnknownNameError, match="fpn"):
        build_head("fpm", *RESNET, out_channels=3)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_head({"name": "fpn", "width": 3}, *RESNET, out_channels=3)
    with pytest.raises(ConfigError, match="channels must be a positive"):
        build_head({"name": "fpn", "channels": 0}, *RESNET, out_channels=3)
    with pytest.raises(ConfigError, match="dropout"):
        build_head({"name": "mlp", "dropout": 1.5}, *RESNET, out_channels=3)
    with pytest.raises(ConfigError, match="has no 'name'"):
        build_head({"channels": 3}, *RESNET, out_channels=3)
