"""Learning to Branch: shapes, the sampled and final architectures are trees, a fixed choice equals the
hand-built network and a transcription of LibMTL's LTB forward (``_transform_resnet_ltb``), the parameter
count, the temperature schedule the trainer drives, errors, a scenes run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from mtlvision.errors import ConfigError
from mtlvision.models.architectures import LTB, RepresentationUnavailable
from mtlvision.models.architectures.ltb import LTBNetwork
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.backbones import create_backbone
from tests.models.test_nddr_cnn import WIDTHS, ConvBackbone
from tests.models.tiny_scenes import TINY_SCENES

TASKS = ["seg", "depth", "cls"]


def build(**hparams) -> LTBNetwork:
    torch.manual_seed(0)
    built = LTB(**hparams).build(ConvBackbone, TASKS)
    assert isinstance(built, LTBNetwork)
    return built


def test_shapes_and_parameter_count() -> None:
    built = build()
    built.set_progress(5, 10)
    out = built(torch.randn(2, 3, 32, 32))
    assert list(out) == TASKS
    for features in out.values():
        assert [tuple(f.shape) for f in features] == [(2, 4, 16, 16), (2, 8, 8, 8), (2, 16, 4, 4)]
    backbone = sum(p.numel() for p in ConvBackbone().parameters())
    stages = len(WIDTHS) - 1
    assert sum(p.numel() for p in built.parameters()) == len(TASKS) * backbone + (stages - 1) * len(TASKS) ** 2


def is_tree(parents: list[list[int]], tasks: int) -> bool:
    """Every block of every stage has exactly one parent block in the stage before (a forest of T stems,
    all reading the image: one tree), and every task's path from its leaf reaches a stem."""
    for stage in parents:
        if len(stage) != tasks or not all(0 <= p < tasks for p in stage):
            return False
    for task in range(tasks):
        node = task
        for stage in reversed(parents):
            node = stage[node]
        if not 0 <= node < tasks:
            return False
    return True


@pytest.mark.parametrize("seed", range(3))
def test_the_sampled_and_the_final_architectures_are_trees(seed: int) -> None:
    built = build()
    torch.manual_seed(seed)
    with torch.no_grad():
        built.logits.normal_()
    built.set_progress(3, 10)
    built.train()
    mixing = built.mixing()
    assert mixing.shape == (2, 3, 3)
    assert torch.equal(mixing.sum(-1), torch.ones(2, 3)) and set(mixing.unique().tolist()) == {0.0, 1.0}
    assert is_tree(mixing.argmax(-1).tolist(), len(TASKS))
    built.eval()
    assert torch.equal(built.mixing().argmax(-1), built.logits.argmax(-1)) and is_tree(built.tree(), len(TASKS))


def test_warm_up_sums_every_parent_and_the_temperature_follows_libmtls_schedule() -> None:
    built = build()
    built.set_progress(0, 200)  # warm-up: epoch < 200/100
    assert built.warming_up() and torch.equal(built.mixing(), torch.ones(2, 3, 3))
    built.set_progress(2, 200)
    assert not built.warming_up()
    assert built.tau() == pytest.approx(200 / 20 / 3**0.5)  # LibMTL: epochs/20/sqrt(epoch+1)


def test_the_straight_through_gradient_reaches_the_logits() -> None:
    built = build()
    built.set_progress(5, 10)
    built.train()
    built(torch.randn(2, 3, 32, 32))["seg"][-1].square().mean().backward()
    assert built.logits.grad is not None and built.logits.grad.abs().sum() > 0
    assert {id(p) for p in built.shared_parameters()} == {id(p) for p in built.parameters()}
    with pytest.raises(RepresentationUnavailable, match="balancer.mode=params"):
        built.encode(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("seed", range(3))
def test_a_fixed_choice_equals_the_hand_built_network(seed: int) -> None:
    built = build()
    torch.manual_seed(seed)
    with torch.no_grad():
        built.logits.normal_()
    built.set_progress(9, 10)
    built.eval()
    parents = built.tree()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = built(images)
        for task, name in enumerate(TASKS):
            path = [task]  # the blocks on the task's path, leaf to stem
            for stage in reversed(parents):
                path.append(stage[path[-1]])
            x = images
            for stage, (block, feature) in enumerate(zip(reversed(path), out[name])):
                x = built.columns[block][stage](x)
                torch.testing.assert_close(feature, x)


def libmtl_ltb_forward(encoders: list[SimpleNamespace], alpha: Tensor, inputs: Tensor) -> list[Tensor]:
    """``_transform_resnet_ltb.forward`` of LibMTL (architecture/LTB.py) at a given ``alpha`` [6, T, T]."""
    t = len(encoders)
    ss_rep: dict[int, list] = {i: [0] * t for i in range(5)}
    for i in range(5):
        for tn in range(t):
            if i == 0:
                e = encoders[tn]
                ss_rep[i][tn] = e.maxpool(e.relu(e.bn1(e.conv1(inputs))))
            else:
                child_rep = sum(alpha[i, tn, j] * ss_rep[i - 1][j] for j in range(t))
                ss_rep[i][tn] = getattr(encoders[tn], f"layer{i}")(child_rep)
    return ss_rep[4]


def test_a_hard_choice_equals_libmtls_ltb_on_a_resnet() -> None:
    """A (small, timm) ResNet: ours cuts its stem before the max-pool (stages conv1-bn1-relu | maxpool-layer1 |
    layer2 | ...), LibMTL after it; with one parent per block the max-pool of the chosen parent is the same
    either way, so the networks agree on hard choices (during warm-up, where blocks sum their parents, they
    differ)."""
    torch.manual_seed(0)
    built = LTB().build(lambda: create_backbone("test_resnet"), ["a", "b"])
    assert isinstance(built, LTBNetwork)
    with torch.no_grad():
        built.logits.normal_()
    built.set_progress(5, 10)
    built.eval()
    encoders = [
        SimpleNamespace(conv1=c[0].conv1, bn1=c[0].bn1, relu=c[0].act1, maxpool=c[1].maxpool, layer1=c[1].layer1,
                        layer2=c[2].layer2, layer3=c[3].layer3, layer4=c[4].layer4)
        for c in built.columns
    ]  # fmt: skip
    alpha = torch.zeros(6, 2, 2)
    alpha[1:5] = built.mixing()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = libmtl_ltb_forward(encoders, alpha, images)
        ours = built(images)
    for task, name in enumerate(["a", "b"]):
        torch.testing.assert_close(ours[name][-1], theirs[task])


def test_errors_name_the_cause() -> None:
    assert "Guo" in ARCHITECTURES.entry("ltb").citation
    with pytest.raises(ConfigError, match="warmup=2"):
        LTB(warmup=2)
    with pytest.raises(ConfigError, match="temperature=0"):
        LTB(temperature=0)
    with pytest.raises(ConfigError, match="chain of backbone stages"):
        LTB().build(lambda: create_backbone("test_vit"), TASKS)


@pytest.mark.slow
def test_scenes_trains_end_to_end_from_the_cli(tmp_path: Path) -> None:
    from mtlvision.cli import main

    settings = {**TINY_SCENES, "model.backbone": "test_resnet", "model.architecture": "ltb", "train.epochs": 2}
    pairs = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()]
    assert main(["train", "scenes", "--set", *pairs, "tasks=[count,segmentation]", "--out", str(tmp_path)]) == 0
    run = next(tmp_path.iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"count", "segmentation"}
