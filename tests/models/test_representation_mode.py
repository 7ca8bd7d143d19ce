"""Representation mode over every registered architecture: either every shared parameter lies before the
shared representation (so a gradient balancer in representation mode reaches all of them), or the
architecture refuses the mode with a clear error."""

from __future__ import annotations

import pytest
import torch

from mtlvision.engine.trainer import Trainer
from mtlvision.models.architectures import MTINet, PADNet, RepresentationUnavailable, TaskAttention
from mtlvision.models.architectures.base import ArchitectureSpec
from mtlvision.models.architectures.registry import ARCHITECTURES
from mtlvision.models.multitask import MultiTaskModel
from mtlvision.tasks import Depth, Segmentation
from tests.models.test_mti_net import batch_of

#: the architectures with a shared representation; every other one must refuse representation mode
WITH_REPRESENTATION = {"hps", "mtan", "mti_net", "padnet", "task_attention"}
#: small hyper-parameters where the defaults are wide (everything else runs with its defaults)
SMALL: dict[str, ArchitectureSpec] = {
    "mti_net": MTINet(channels=(8, 8, 8, 8)),
    "padnet": PADNet(width=8),
    "task_attention": TaskAttention(dim=16, depth=1, heads=2, mlp_ratio=2),
}


def model_for(name: str) -> tuple[MultiTaskModel, list]:
    spec = SMALL.get(name) or ARCHITECTURES.get(name)()
    tasks = [Segmentation("seg", num_classes=5), Depth("depth")]
    torch.manual_seed(0)
    return MultiTaskModel(spec.backbone or "test_resnet", tasks, architecture=spec), tasks


@pytest.mark.parametrize("name", sorted(WITH_REPRESENTATION))
def test_mgda_in_representation_mode_reaches_every_shared_parameter(name: str) -> None:
    """The trainer cuts the graph at encode()'s output: a shared parameter after it would never train.
    (A gradient may be exactly zero at initialisation, e.g. behind a zero-initialised residual BN; it
    may not be missing.)"""
    model, tasks = model_for(name)
    trainer = Trainer(model, "mgda", epochs=1, device="cpu", progress=False, balancer_mode="representation")
    assert trainer.train_step([batch_of(tasks)]) is not None
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    assert shared
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("name", sorted(set(ARCHITECTURES.names()) - WITH_REPRESENTATION))
def test_the_others_refuse_representation_mode_clearly(name: str) -> None:
    model, tasks = model_for(name)
    trainer = Trainer(model, "mgda", epochs=1, device="cpu", progress=False, balancer_mode="representation")
    with pytest.raises(RepresentationUnavailable, match="balancer.mode=params"):
        trainer.train_step([batch_of(tasks)])
