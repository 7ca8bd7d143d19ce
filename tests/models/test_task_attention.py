"""Task-prompted cross-task attention: starts as hard sharing, parameter count, attention across tasks,
the shared representation, errors, a scenes run with ONNX export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from mtlvision.errors import ConfigError
from mtlvision.models.architectures import HPS, TaskAttention
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.architectures.task_attention import CrossTaskAttention
from mtlvision.models.backbones import create_backbone
from tests.models.tiny_scenes import TINY_SCENES

TASKS = ["seg", "depth", "cls"]


@pytest.fixture(scope="module")
def factory():
    torch.manual_seed(0)
    prototype = create_backbone("test_resnet")
    return lambda: copy.deepcopy(prototype)


def test_starts_as_hard_sharing(factory) -> None:
    backbone = factory()
    attended = TaskAttention(dim=32, heads=4).build(lambda: copy.deepcopy(backbone), TASKS).eval()
    plain = HPS().build(lambda: copy.deepcopy(backbone), TASKS).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, expected = attended(images), plain(images)
    for name in TASKS:
        for a, b in zip(out[name], expected[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dim,depth,heads,ratio", [(32, 1, 4, 2), (64, 3, 8, 4)])
def test_parameter_count(factory, dim: int, depth: int, heads: int, ratio: int) -> None:
    built = TaskAttention(dim=dim, depth=depth, heads=heads, mlp_ratio=ratio).build(factory, TASKS)
    channels = built.feature_channels[-1]
    layer = 4 * dim * dim + 4 * dim + 2 * ratio * dim * dim + ratio * dim + dim + 4 * dim  # attention, MLP, 2 norms
    expected = (
        channels * dim + dim  # project_in
        + 9 * dim + dim  # depthwise position encoding
        + len(TASKS) * dim  # task prompts
        + depth * layer
        + 2 * dim  # final norm
        + dim * channels + channels  # project_out
    )  # fmt: skip
    backbone = sum(p.numel() for p in built.backbone.parameters())
    assert sum(p.numel() for p in built.parameters()) - backbone == expected


def test_tasks_attend_to_each_other(factory) -> None:
    torch.manual_seed(1)
    built = TaskAttention(dim=32, heads=4).build(factory, TASKS)
    assert isinstance(built, CrossTaskAttention)
    nn.init.normal_(built.project_out.weight, std=0.1)
    out = built(torch.randn(2, 3, 64, 64))
    assert not torch.allclose(out["seg"][-1], out["depth"][-1])
    for a, b in zip(out["seg"][:-1], out["depth"][:-1]):
        assert a is b  # the finer scales are the shared backbone's
    out["seg"][-1].square().mean().backward()
    grad = built.task_prompts.grad
    assert grad is not None and all(grad[index].abs().sum() > 0 for index in range(len(TASKS)))
    shared = {id(p) for p in built.shared_parameters()}
    assert id(built.task_prompts) not in shared and len(shared) == len(list(built.parameters())) - 1


def test_encode_decode_is_the_forward(factory) -> None:
    built = TaskAttention(dim=32, heads=4, level=2).build(factory, TASKS).eval()
    nn.init.normal_(built.project_out.weight, std=0.1)
    images = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        split, whole = built.decode(built.encode(images)), built(images)
    for name in TASKS:
        for a, b in zip(split[name], whole[name]):
            torch.testing.assert_close(a, b)


def test_errors_name_the_field(factory) -> None:
    assert "in the spirit of" in ARCHITECTURES.entry("task_attention").citation
    with pytest.raises(ConfigError, match="heads=3 must divide dim=32"):
        TaskAttention(dim=32, heads=3)
    with pytest.raises(ConfigError, match="depth=0"):
        TaskAttention(depth=0)
    with pytest.raises(ConfigError, match="level=7 is out of range"):
        TaskAttention(level=7).build(factory, TASKS)


@pytest.mark.slow
def test_scenes_trains_and_exports(tmp_path: Path) -> None:
    from mtlvision import api

    overrides = {
        **TINY_SCENES,
        "model.backbone": "test_resnet",
        "model.architecture": {"name": "task_attention", "dim": 32, "heads": 4},
        "tasks": ["count", "segmentation", "depth"],
    }
    run = api.train("scenes", overrides, out=tmp_path, name="task-attention")
    report = api.export(run.path)
    assert report.outputs == ["count", "segmentation", "depth"] and report.max_abs_difference < 1e-4
