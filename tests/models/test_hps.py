"""Hard parameter sharing: one backbone, the same features for every task, encode/decode split."""

from __future__ import annotations

import torch

from mtlvision.models.architectures import ARCHITECTURES, HPS
from mtlvision.models.architectures.hps import HardSharing
from mtlvision.models.backbones import create_backbone

TASKS = ["seg", "depth", "cls"]


def test_registered_and_built_from_config_style_params() -> None:
    spec = ARCHITECTURES.get("hps")()
    assert isinstance(spec, HPS) and spec.describe() == {"name": "hps"}
    assert "Caruana" in ARCHITECTURES.entry("hps").citation


def test_every_task_gets_the_backbone_features() -> None:
    built = HPS().build(lambda: create_backbone("resnet18"), TASKS)
    assert isinstance(built, HardSharing)
    images = torch.rand(2, 3, 32, 32)
    built.eval()
    with torch.no_grad():
        features = built(images)
        expected = built.backbone(images)
    assert list(features) == TASKS
    for name in TASKS:
        assert len(features[name]) == len(expected)
        for ours, reference in zip(features[name], expected):
            torch.testing.assert_close(ours, reference)
    assert built.feature_channels == built.backbone.feature_channels == [64, 64, 128, 256, 512]
    assert built.feature_strides == [2, 4, 8, 16, 32]


def test_factory_called_once_and_all_parameters_shared() -> None:
    calls = []

    def factory():
        calls.append(1)
        return create_backbone("resnet18")

    built = HPS().build(factory, TASKS)
    assert len(calls) == 1
    shared = {id(p) for p in built.shared_parameters()}
    assert shared == {id(p) for p in built.parameters()}


def test_encode_then_decode_equals_forward_and_carries_gradients() -> None:
    built = HPS().build(lambda: create_backbone("resnet18"), TASKS).eval()
    images = torch.rand(2, 3, 32, 32)
    representation = built.encode(images)
    decoded = built.decode(representation)
    for name in TASKS:
        assert all(a is b for a, b in zip(decoded[name], representation))
    grads = torch.autograd.grad(decoded["seg"][-1].sum(), representation)
    assert torch.equal(grads[-1], torch.ones_like(grads[-1]))
    assert all(g.abs().sum() > 0 for g in grads[:-1])  # earlier scales reach the loss through later ones
