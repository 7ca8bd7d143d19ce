"""MTI-Net: shapes for every pixel-map task, the paper's parameter count, deep supervision in the training
loss, gradients to every block, the shared part, errors, and scenes runs with a balancer in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtlvision.cli import main
from mtlvision.engine.trainer import Trainer
from mtlvision.errors import ConfigError
from mtlvision.models.architectures import MTINet
from mtlvision.models.architectures.base import DEEP_SUPERVISION, intermediate_key
from mtlvision.models.architectures.mti_net import (
    BasicBlock,
    MultiScaleTaskInteraction,
    SpatialAttention,
    SqueezeExcitation,
)
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.multitask import MultiTaskModel
from mtlvision.tasks import Classification, Depth, Edges, Normals, Segmentation
from mtlvision.tasks.base import Task
from tests.models.tiny_scenes import TINY_SCENES

CHANNELS = (8, 8, 16, 16)


def dense_tasks() -> list[Task]:
    return [Segmentation("seg", num_classes=5), Depth("depth"), Normals("normals"), Edges("edges")]


def model_of(tasks: list[Task], spec: MTINet | None = None, backbone: str = "test_resnet") -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel(backbone, tasks, architecture=spec or MTINet(channels=CHANNELS))


def batch_of(tasks: list[Task], size: int = 32) -> dict:
    generator = torch.Generator().manual_seed(1)
    targets = {
        "seg": torch.randint(0, 5, (2, size, size), generator=generator),
        "depth": torch.rand(2, 1, size, size, generator=generator) + 0.5,
        "normals": F.normalize(torch.randn(2, 3, size, size, generator=generator), dim=1),
        "edges": torch.randint(0, 2, (2, size, size), generator=generator),
        "cls": torch.randint(0, 3, (2,), generator=generator),
    }
    return {
        "image": torch.rand(2, 3, size, size, generator=generator),
        "targets": {t.name: targets[t.name] for t in tasks},
        "valid": {t.name: torch.ones(2, dtype=torch.bool) for t in tasks},
    }


def test_every_pixel_map_task_gets_its_prediction_and_four_intermediate_ones() -> None:
    tasks = [*dense_tasks(), Classification("cls", num_classes=3)]
    model = model_of(tasks)
    architecture = model.architecture
    assert isinstance(architecture, MultiScaleTaskInteraction)
    assert architecture.feature_channels == list(CHANNELS) and architecture.feature_strides == [4, 8, 16, 32]
    images = torch.rand(2, 3, 32, 32)
    out = model(images)
    shapes = {"seg": (2, 5, 32, 32), "depth": (2, 1, 32, 32), "normals": (2, 3, 32, 32), "edges": (2, 1, 32, 32)}
    for name, shape in shapes.items():
        assert out[name].shape == shape
        assert [p.shape for p in out[DEEP_SUPERVISION][name]] == [shape] * 4
    torch.testing.assert_close(out["normals"].norm(dim=1), torch.ones(2, 32, 32))  # postprocessed like the head's
    for prediction in out[DEEP_SUPERVISION]["normals"]:
        torch.testing.assert_close(prediction.norm(dim=1), torch.ones(2, 32, 32))
    assert out["cls"].shape == (2, 3) and "cls" not in out[DEEP_SUPERVISION]
    raw = architecture(model.normalise(images))
    assert [f.shape[-1] for f in raw["seg"]] == [8, 4, 2, 1]  # distilled features, fine to coarse
    assert [p.shape[-1] for p in raw[intermediate_key("seg")]] == [8, 4, 2, 1]
    assert [f.shape[1] for f in raw["cls"]] == list(CHANNELS)  # the backbone's, projected to the task channels
    model.eval()
    assert set(model(images)) == set(shapes) | {"cls"}  # inference and export see the tasks only


def test_vit_feature_pyramid_and_two_scales() -> None:
    model = model_of(dense_tasks()[:2], MTINet(scales=2), backbone="test_vit")
    assert model.architecture.feature_strides == [16, 32]
    out = model(torch.rand(2, 3, 32, 32))
    assert out["seg"].shape == (2, 5, 32, 32) and len(out[DEEP_SUPERVISION]["depth"]) == 2


def conv_bn(i: int, o: int, k: int) -> int:
    return k * k * i * o + 2 * o


def basic_block(i: int, o: int) -> int:
    return conv_bn(i, o, 3) + conv_bn(o, o, 3) + (conv_bn(i, o, 1) if i != o else 0)


def test_parameter_count_follows_the_papers_blocks() -> None:
    """Per scale s (task channels w_s, backbone channels c_s, N tasks with outputs o_t): initial prediction
    N (BB(c_s + w_{s+1}, w_s) + BB(w_s, w_s)) + Σ_t (w_s o_t + o_t); FPM (all but the finest scale), with
    S = N w_s: BB(S, S/4) + BB(S/4, S/4) + (S/4 · S + S) + BB(S, w_s) + N SE(w_s); distillation
    N (N − 1) · 2 · 9 w_s² (two bias-free 3×3 convolutions per pair of tasks)."""
    tasks = dense_tasks()
    model = model_of(tasks)
    outputs = [t.output_channels for t in tasks]
    n = len(tasks)
    backbone_channels = model.architecture.backbone.feature_channels[-4:]
    expected = sum(p.numel() for p in model.architecture.backbone.parameters())
    for s, (c, w) in enumerate(zip(backbone_channels, CHANNELS)):
        coarser = CHANNELS[s + 1] if s + 1 < len(CHANNELS) else 0
        expected += n * (basic_block(c + coarser, w) + basic_block(w, w)) + sum(w * o + o for o in outputs)
        if s > 0:
            total, hidden = n * w, max(1, w // 16)
            se = w * hidden + hidden + hidden * w + w
            expected += basic_block(total, total // 4) + basic_block(total // 4, total // 4)
            expected += total // 4 * total + total + basic_block(total, w) + n * se
        expected += n * (n - 1) * 2 * 9 * w * w
    assert sum(p.numel() for p in model.architecture.parameters()) == expected


def test_intermediate_losses_join_each_tasks_training_loss() -> None:
    tasks = dense_tasks()
    model = model_of(tasks)
    trainer = Trainer(model, "ew", epochs=1, device="cpu", progress=False)
    batch = batch_of(tasks)
    predictions = model(batch["image"])
    losses = trainer.task_losses(predictions, batch)
    raw = model.architecture(model.normalise(batch["image"]))
    for index, task in enumerate(tasks):
        target, valid = batch["targets"][task.name], batch["valid"][task.name]
        expected = task.loss(predictions[task.name], target, valid)
        for intermediate in raw[intermediate_key(task.name)]:
            resized = F.interpolate(intermediate, size=(32, 32), mode="bilinear", align_corners=False)
            expected = expected + task.loss(task.postprocess(resized), target, valid)
        torch.testing.assert_close(losses[index], expected)
        assert losses[index] > task.loss(predictions[task.name], target, valid)


def test_gradient_reaches_every_block_and_the_shared_part_is_what_several_tasks_use() -> None:
    tasks = [*dense_tasks()[:3], Classification("cls", num_classes=3)]
    model = model_of(tasks, MTINet(channels=(16, 32, 32, 48)))  # SE blocks of 2-3 hidden units
    architecture = model.architecture
    assert isinstance(architecture, MultiScaleTaskInteraction)
    trainer = Trainer(model, "ew", epochs=1, device="cpu", progress=False)
    batch = batch_of(tasks)
    losses = trainer.task_losses(model(batch["image"]), batch)
    reached: dict[int, int] = {}
    for index in range(len(tasks)):
        model.zero_grad()
        losses[index].backward(retain_graph=True)
        for p in model.parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                reached[id(p)] = reached.get(id(p), 0) + 1
    backbone = {id(p) for p in architecture.backbone.parameters()}
    # every block learns (a parameter may not: a ReLU dead at init, an L1 bias at the median)
    blocks = [m for m in architecture.modules() if isinstance(m, (BasicBlock, SqueezeExcitation, SpatialAttention))]
    blocks += [decoder for initial in architecture.initial for decoder in initial.decoders] + list(model.heads.values())
    assert len(blocks) == 4 * 3 * 2 + 3 * (3 + 3) + 4 * 3 * 2 + 4 * 3 + 4
    assert all(any(id(p) in reached for p in block.parameters()) for block in blocks)
    assert all(id(p) in reached for p in architecture.passed["cls"][-1].parameters())  # the pooled scale
    assert backbone & set(reached)
    shared = {id(p) for p in model.shared_parameters()} - backbone
    assert shared & set(reached) == {i for i, count in reached.items() if count > 1} - backbone


def test_encode_then_decode_equals_forward() -> None:
    model = model_of([*dense_tasks()[:2], Classification("cls", num_classes=3)]).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        direct = model(images)
        through = model.predict_from_representation(model.encode(images), (32, 32))
    for name in direct:
        torch.testing.assert_close(direct[name], through[name])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MTINet(scales=0), "scales=0"),
        (lambda: MTINet(channels=(8, 8)), "one channel count per used scale"),
        (lambda: MTINet(channels=(8, 8, 0, 8)), "channels=0"),
        (lambda: model_of([Segmentation("seg", num_classes=3), Classification("c", 3)]), "two pixel-map tasks"),
        (lambda: model_of(dense_tasks()[:2], MTINet(scales=6)), "at most 5"),
        (lambda: model_of(dense_tasks()[:2], MTINet(channels=(1, 1, 1, 1))), "at least 4"),
        (lambda: MTINet().build(lambda: None, ["a", "b"]), "output channels"),
    ],
)
def test_bad_configurations_are_clear_errors(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_registered_with_its_paper() -> None:
    entry = ARCHITECTURES.entry("mti_net")
    assert "Vandenhende" in entry.citation and "ECCV 2020" in entry.citation


@pytest.mark.parametrize("mode", ["params", "representation"])
def test_a_gradient_balancer_updates_every_shared_parameter(mode: str) -> None:
    """The shared part ends where encode() ends, so representation mode reaches the FPMs and the task
    feature refinements too, not only the backbone."""
    tasks = dense_tasks()[:2]
    model = model_of(tasks, MTINet(channels=(8, 8, 8, 8)))
    trainer = Trainer(model, "mgda", epochs=1, device="cpu", progress=False, balancer_mode=mode)
    assert trainer.train_step([batch_of(tasks)]) is not None
    assert all(p.grad is not None for p in model.shared_parameters())
    assert all(p.grad is not None for p in model.task_specific_parameters())


@pytest.mark.slow
def test_scenes_dense_trains_end_to_end(tmp_path: Path) -> None:
    tiny = [f"{key}={value}" for key, value in TINY_SCENES.items()]
    args = ["model.backbone=test_resnet", "model.architecture={name: mti_net, channels: [8, 8, 8, 8]}"]
    args += ["balancer.name=mgda", "balancer.mode=representation"]
    assert main(["train", "scenes_dense", "--set", *tiny, *args, "--out", str(tmp_path), "--name", "mti"]) == 0
    report = json.loads((tmp_path / "mti" / "metrics.json").read_text())
    assert set(report["metrics"]) == {"segmentation", "depth", "normals", "edges"}
    assert "nan" not in (tmp_path / "mti" / "history.csv").read_text().lower()
