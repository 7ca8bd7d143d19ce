"""MultiTaskModel: dict out, heads per task, parameter partition, representation mode, init, pretrained,
freezing and complexity."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from mtlvision.errors import ConfigError, UnknownNameError
from mtlvision.models import (
    HPS,
    INIT_SCHEMES,
    Architecture,
    ArchitectureSpec,
    Backbone,
    BackboneStage,
    MultiTaskModel,
    create_backbone,
)
from mtlvision.models.complexity import count_flops, count_parameters, model_complexity
from mtlvision.models.heads import ASPPHead, FPNHead, MLPHead
from mtlvision.tasks.base import TargetKind, Task, masked_mean


class _TaskDouble(Task):
    """The parts of the Task contract the model uses; the data and metric side is not exercised here."""

    metric_directions: ClassVar[dict[str, bool]] = {"loss": False}
    primary_metric: ClassVar[str] = "loss"

    def __init__(self, name: str, channels: int) -> None:
        super().__init__(name)
        self.channels = channels

    @property
    def output_channels(self) -> int:
        return self.channels

    def metric(self) -> Any:
        raise NotImplementedError

    def placeholder_target(self, height: int, width: int) -> Any:
        raise NotImplementedError

    def check_target(self, target: Any, where: str) -> None:
        raise NotImplementedError

    def decode(self, prediction: Any) -> list[Any]:
        raise NotImplementedError

    def draw(self, image: np.ndarray, decoded: Any) -> np.ndarray:
        raise NotImplementedError


class ClassifyDouble(_TaskDouble):
    kind = "classify_double"
    target_kind = TargetKind.LABEL
    level = "image"
    default_head = "mlp"

    def loss(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        return masked_mean(F.cross_entropy(prediction, target, reduction="none"), valid)


class DepthDouble(_TaskDouble):
    """Dense task whose prediction is made positive by ``postprocess``."""

    kind = "depth_double"
    target_kind = TargetKind.DEPTH
    level = "dense"
    default_head = "fpn"

    def postprocess(self, raw: Tensor) -> Tensor:
        return F.softplus(raw)

    def loss(self, prediction: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        return masked_mean((prediction - target).abs().flatten(1).mean(1), valid)


class OwnHeadDouble(DepthDouble):
    """A task that brings its own head (as detection does)."""

    kind = "own_head_double"

    def build_custom_head(self, feature_channels, feature_strides) -> nn.Module:
        return OwnHead(feature_channels[-1], self.channels)


class OwnHead(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        return self.conv(features[-1])


def tasks() -> list[Task]:
    return [ClassifyDouble("cls", 3), DepthDouble("depth", 1)]


@pytest.fixture(scope="module")
def resnet18():
    """One timm resnet18, deep-copied per model: building timm models is the slow part of these tests."""
    torch.manual_seed(0)
    prototype = create_backbone("resnet18")
    return lambda: copy.deepcopy(prototype)


@pytest.fixture
def images() -> Tensor:
    return torch.rand(2, 3, 33, 47, generator=torch.Generator().manual_seed(0))


def test_forward_returns_one_postprocessed_prediction_per_task(resnet18, images) -> None:
    model = MultiTaskModel(resnet18, tasks())
    out = model(images)
    assert list(out) == ["cls", "depth"]
    assert out["cls"].shape == (2, 3)
    assert out["depth"].shape == (2, 1, 33, 47) and bool((out["depth"] > 0).all())
    assert isinstance(model.heads["cls"], MLPHead) and isinstance(model.heads["depth"], FPNHead)
    assert set(model.tasks) == {"cls", "depth"}


def test_backward_reaches_every_parameter(resnet18, images) -> None:
    model = MultiTaskModel(resnet18, tasks())
    out = model(images)
    targets = {"cls": torch.tensor([0, 2]), "depth": torch.rand(2, 1, 33, 47)}
    valid = torch.ones(2, dtype=torch.bool)
    total = sum(task.loss(out[name], targets[name], valid) for name, task in model.tasks.items())
    total.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name


def test_images_are_normalised_inside(resnet18) -> None:
    model = MultiTaskModel(resnet18, tasks(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.heads["cls"](model.architecture((images - 0.5) / 0.25)["cls"], (32, 32))
        torch.testing.assert_close(model(images)["cls"], expected)
    with pytest.raises(ConfigError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(2, 1, 32, 32))


def test_head_choice_per_task_and_tasks_with_their_own_head(resnet18, images) -> None:
    model = MultiTaskModel(
        resnet18,
        [ClassifyDouble("cls", 3), DepthDouble("depth", 1), OwnHeadDouble("own", 2)],
        heads={"depth": {"name": "aspp", "channels": 16}, "cls": "linear"},
    )
    assert isinstance(model.heads["depth"], ASPPHead) and model.heads["depth"].aspp.project[0].out_channels == 16
    assert isinstance(model.heads["cls"], nn.Module) and type(model.heads["cls"]).__name__ == "LinearHead"
    assert isinstance(model.heads["own"], OwnHead)
    out = model(images)
    assert out["own"].shape == (2, 2, 2, 2)


def test_bad_model_arguments_are_config_errors(resnet18) -> None:
    with pytest.raises(ConfigError, match="unknown tasks"):
        MultiTaskModel(resnet18, tasks(), heads={"segm": "fpn"})
    with pytest.raises(ConfigError, match="unique"):
        MultiTaskModel(resnet18, [DepthDouble("a", 1), DepthDouble("a", 1)])
    with pytest.raises(ConfigError, match="at least one task"):
        MultiTaskModel(resnet18, [])
    with pytest.raises(ConfigError, match="Nothing is downloaded"):
        MultiTaskModel(resnet18, tasks(), init="pretrained")


def test_shared_and_task_specific_parameters_partition_the_model(resnet18) -> None:
    model = MultiTaskModel(resnet18, tasks())
    shared = [id(p) for p in model.shared_parameters()]
    specific = [id(p) for p in model.task_specific_parameters()]
    everything = [id(p) for p in model.parameters()]
    assert not set(shared) & set(specific)
    assert sorted(shared + specific) == sorted(everything)
    assert set(shared) == {id(p) for p in model.architecture.backbone.parameters()}
    assert set(specific) == {id(p) for p in model.heads.parameters()}


def test_representation_mode_matches_forward(resnet18, images) -> None:
    model = MultiTaskModel(resnet18, tasks()).eval()
    plain = model(images)
    predictions, representation = model.forward_with_representation(images)
    for name in plain:
        torch.testing.assert_close(predictions[name], plain[name])
    assert [r.shape[1] for r in representation] == model.architecture.feature_channels
    grads = torch.autograd.grad(predictions["cls"].sum(), representation)
    assert all(g.abs().sum() > 0 for g in grads)  # the pooled coarsest map depends on every scale


def test_parameter_groups_split_backbone_and_heads(resnet18) -> None:
    model = MultiTaskModel(resnet18, tasks())
    groups = model.parameter_groups(backbone_lr_scale=0.1)
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    ids = [[id(p) for p in g["params"]] for g in groups]
    assert sorted(ids[0] + ids[1]) == sorted(id(p) for p in model.parameters())
    assert set(ids[0]) == {id(p) for p in model.architecture.backbone.parameters()}
    optimizer = torch.optim.SGD([{**g, "lr": 1.0 * g["lr_scale"]} for g in groups], lr=1.0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 1.0]


def test_frozen_stages_do_not_change_during_training(resnet18, images) -> None:
    model = MultiTaskModel(resnet18, tasks(), freeze_stages=2)
    model.train()
    stages = model.architecture.backbone.stages
    frozen = copy.deepcopy(stages[:2].state_dict())
    trainable = copy.deepcopy(stages[2].state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(images)
    (out["cls"].sum() + out["depth"].mean()).backward()
    optimizer.step()
    for key, value in stages[:2].state_dict().items():
        torch.testing.assert_close(value, frozen[key], msg=key)
    assert any(not torch.equal(v, trainable[k]) for k, v in stages[2].state_dict().items())
    with pytest.raises(ConfigError, match="out of range"):
        model.freeze_backbone_stages(9)


def _layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def tiny_backbone() -> Backbone:
    """Two stages ending in 512 channels (like ResNet-18) but cheap to re-initialise."""
    stages = [
        BackboneStage(0, OrderedDict(conv=nn.Conv2d(3, 16, 3, stride=2, padding=1), act=nn.ReLU())),
        BackboneStage(1, OrderedDict(conv=nn.Conv2d(16, 512, 3, stride=2, padding=1), act=nn.ReLU())),
    ]
    return Backbone("tiny", stages, [16, 512], [2, 4], {})


@pytest.mark.parametrize("scheme", INIT_SCHEMES.names())
def test_init_schemes_set_heads_and_backbone(scheme: str) -> None:
    torch.manual_seed(0)
    reference = tiny_backbone()
    torch.manual_seed(0)
    model = MultiTaskModel(tiny_backbone, tasks(), init=scheme)
    # The MLP head's first layer: 512 -> 256, large enough for the statistics to be sharp.
    layer = model.heads["cls"].mlp[0]
    weight = layer.weight.detach()
    fan_out, fan_in = weight.shape
    assert torch.count_nonzero(layer.bias) == 0
    if scheme == "kaiming":
        assert weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)
    elif scheme == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert weight.abs().max().item() <= bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)
    elif scheme == "xavier_normal":
        assert weight.mean().item() == pytest.approx(0.0, abs=0.01)
        assert weight.std().item() == pytest.approx(math.sqrt(2.0 / (fan_in + fan_out)), rel=0.05)
        assert weight.abs().max().item() > math.sqrt(6.0 / (fan_in + fan_out))  # normal, not uniform
    else:
        torch.testing.assert_close(weight @ weight.T, torch.eye(fan_out), atol=1e-4, rtol=0)
    conv = model.architecture.backbone.stages[1].conv.weight.detach().flatten(1)
    assert not torch.equal(conv, reference.stages[1].conv.weight.flatten(1))  # the backbone is re-initialised
    if scheme == "orthogonal":
        torch.testing.assert_close(conv.T @ conv, torch.eye(conv.shape[1]), atol=1e-4, rtol=0)
    assert all(torch.count_nonzero(m.bias) == 0 for m in _layers(model.heads) if m.bias is not None)


def test_pretrained_backbone_keeps_the_file_weights(tmp_path, images) -> None:
    torch.manual_seed(5)
    plain = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    model = MultiTaskModel("resnet18", tasks(), init="pretrained", pretrained=str(path)).eval()
    backbone_state = model.architecture.backbone.state_dict()
    for key, source in model.architecture.backbone.source_keys.items():
        torch.testing.assert_close(backbone_state[key], plain.state_dict()[source], msg=key)
    plain.eval()
    with torch.no_grad():
        normalised = model.normalise(images)
        torch.testing.assert_close(model.architecture.backbone(normalised)[-1], plain.forward_features(normalised))
    assert model.describe()["pretrained"] == str(path)


def test_parameter_counts_add_up(resnet18) -> None:
    model = MultiTaskModel(resnet18, tasks())
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["shared"] == sum(p.numel() for p in model.architecture.backbone.parameters())
    assert counts["shared"] + counts["task_specific"] == counts["total"]
    model.freeze_backbone_stages(5)
    assert count_parameters(model)["trainable"] == counts["task_specific"]


def test_flops_grow_with_the_image_and_split_into_parts(resnet18) -> None:
    model = MultiTaskModel(resnet18, tasks())
    model.train()
    sizes = [(32, 32), (48, 64), (64, 64)]
    flops = [count_flops(model, size) for size in sizes]
    assert 0 < flops[0]["total"] < flops[1]["total"] < flops[2]["total"]
    for f in flops:
        assert 0 < f["backbone"] and 0 < f["heads"] and f["backbone"] + f["heads"] == f["total"]
        assert f["shared"] == f["backbone"]  # hard sharing: the backbone is the shared part
    assert model.training  # the counter restores the mode
    # ResNet-18's convolutions and classifier are 1.82 GMACs at 224x224 (He et al. 2016, Table 1: 1.8e9
    # FLOPs counting multiply-adds); the backbone lacks the final 512x1000 classifier.
    backbone_macs = count_flops(model, (224, 224))["backbone"] // 2
    assert backbone_macs == pytest.approx(1.82e9 - 512 * 1000, rel=0.01)
    report = model_complexity(model, (64, 64))
    assert report["macs"]["total"] == report["flops"]["total"] // 2
    assert report["parameters"]["total"] == count_parameters(model)["total"]


def test_architecture_spec_defaults_to_hps(resnet18) -> None:
    model = MultiTaskModel(resnet18, tasks())
    assert isinstance(model.architecture_spec, HPS)
    assert model.describe()["architecture"] == {"name": "hps"}


def test_unknown_init_scheme_lists_the_choices() -> None:
    with pytest.raises(UnknownNameError, match="kaiming, orthogonal, xavier, xavier_normal, pretrained"):
        MultiTaskModel(tiny_backbone, tasks(), init="he")


class _SplitAfterFirstStage(ArchitectureSpec):
    """Test double: stage 0 shared, stage 1 copied per task (a minimal 'split' architecture)."""

    name = "split_double"

    def build(self, backbone_factory, task_names) -> Architecture:
        return _Split(backbone_factory, task_names)


class _Split(Architecture):
    def __init__(self, backbone_factory, task_names) -> None:
        super().__init__()
        backbone = backbone_factory()
        self.stem = backbone.stages[0]
        self.branches = nn.ModuleDict({name: backbone_factory().stages[1] for name in task_names})
        self.feature_channels, self.feature_strides = backbone.feature_channels, backbone.feature_strides

    def forward(self, images: Tensor) -> dict[str, list[Tensor]]:
        shared = self.stem(images)
        return {name: [shared, branch(shared)] for name, branch in self.branches.items()}

    def shared_parameters(self):
        return self.stem.parameters()


def test_shared_flops_count_only_the_shared_modules() -> None:
    model = MultiTaskModel(tiny_backbone, tasks(), architecture=_SplitAfterFirstStage())
    flops = count_flops(model, (32, 32))
    stem = 2 * 16 * 3 * 9 * 16 * 16  # one 3x3 conv, 3 -> 16 channels, on a 16 x 16 output
    branch = 2 * 512 * 16 * 9 * 8 * 8  # one 3x3 conv, 16 -> 512 channels, on an 8 x 8 output
    assert flops["shared"] == stem
    assert flops["backbone"] == stem + 2 * branch
    assert flops["total"] == flops["backbone"] + flops["heads"]
    groups = model.parameter_groups()
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for p in [*model.architecture.stem.parameters(), *model.architecture.branches.parameters()]
    }
    model.freeze_backbone_stages(2)
    assert not any(p.requires_grad for p in model.architecture.branches.parameters())
