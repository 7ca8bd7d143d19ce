"""NDDR-CNN: identity initialisation equals separate networks, the paper's parameter count and
initialisation, every copy shared through the fusion, errors, a scenes run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures import NDDRCNN, RepresentationUnavailable
from mtlvision.models.architectures.nddr_cnn import NDDRNetwork
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import create_backbone
from tests.models.tiny_scenes import TINY_SCENES

TASKS = ["seg", "depth", "cls"]
WIDTHS = [3, 4, 8, 16]


class ConvBackbone(nn.Module):
    """Three conv-BN-ReLU stages (channels 4, 8, 16 at strides 2, 4, 8), random BN statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(WIDTHS, WIDTHS[1:])
        )
        self.feature_channels = WIDTHS[1:]
        self.feature_strides = [2, 4, 8]
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def test_identity_initialisation_is_separate_networks() -> None:
    """alpha=1, beta=0: each task's features are its own copy's (the fresh layers' batch norm is the
    identity in eval mode once its eps is 0, and their ReLU keeps the non-negative stage outputs)."""
    torch.manual_seed(0)
    built = NDDRCNN(alpha=1.0, beta=0.0).build(ConvBackbone, TASKS)
    assert isinstance(built, NDDRNetwork)
    built.eval()
    for module in built.fusions.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 0.0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = built(images)
        for task, column in zip(TASKS, built.columns):
            x = images
            for stage, feature in zip(column, out[task]):
                x = stage(x)
                torch.testing.assert_close(feature, x)
    assert not torch.allclose(out["seg"][-1], out["depth"][-1])  # the copies are independent networks


def test_parameter_count_and_initialisation_follow_the_paper() -> None:
    torch.manual_seed(0)
    built = NDDRCNN().build(ConvBackbone, TASKS)
    backbone = sum(p.numel() for p in ConvBackbone().parameters())
    fusion = sum(len(TASKS) * (len(TASKS) * c * c + 2 * c) for c in WIDTHS[1:])
    assert sum(p.numel() for p in built.parameters()) == len(TASKS) * backbone + fusion
    layer = built.fusions[1]
    for task, reduction in enumerate(layer.reductions):
        weight = reduction[0].weight[:, :, 0, 0]
        for other in range(len(TASKS)):
            block = weight[:, 8 * other : 8 * (other + 1)]
            torch.testing.assert_close(block, torch.eye(8) * (0.9 if other == task else 0.1))


def test_every_copy_is_shared_through_the_fusion() -> None:
    torch.manual_seed(0)
    built = NDDRCNN().build(ConvBackbone, TASKS)
    assert {id(p) for p in built.shared_parameters()} == {id(p) for p in built.parameters()}
    built(torch.randn(2, 3, 32, 32))["seg"][-1].square().mean().backward()
    for column in built.columns:  # the segmentation loss reaches every task's copy
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in column[0].parameters())
    with pytest.raises(RepresentationUnavailable, match="balancer.mode=params"):
        built.encode(torch.randn(1, 3, 32, 32))


def test_errors_name_the_cause() -> None:
    assert "Gao" in ARCHITECTURES.entry("nddr_cnn").citation
    with pytest.raises(ConfigError, match="alpha=nan"):
        NDDRCNN(alpha=float("nan"))
    with pytest.raises(ConfigError, match="chain of backbone stages"):
        NDDRCNN().build(lambda: create_backbone("test_vit"), TASKS)


@pytest.mark.slow
def test_scenes_trains_end_to_end(tmp_path: Path) -> None:
    from mtlvision import api

    overrides = {
        **TINY_SCENES,
        "model.backbone": "test_resnet",
        "model.architecture": "nddr_cnn",
        "tasks": ["count", "segmentation", "depth"],
    }
    run = api.train("scenes", overrides, out=tmp_path, name="nddr")
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"count", "segmentation", "depth"}
