"""TAG's lookahead affinity: exact on a hand-made problem, equal to a plain autograd lookahead inside a run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mtlvision.balancers import RecordedStep
from mtlvision.engine.affinity_run import AFFINITY_NAME, TaskAffinity
from mtlvision.engine.probes import ProbeContext
from mtlvision.engine.trainer import Trainer
from mtlvision.errors import ConfigError
from mtlvision.models import MultiTaskModel
from mtlvision.tasks import TASKS

from .tinyrun import TinyScenes, _without_batch_norm, tiny_backbone


def quadratic_context(theta: torch.Tensor, u: torch.Tensor, lr: float) -> ProbeContext:
    """Shared θ; L_a = L_b = ‖θ − u‖² (the same task twice), L_c = ‖θ + u‖² (the opposite target)."""

    def losses_at(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([((t - u) ** 2).sum(), ((t - u) ** 2).sum(), ((t + u) ** 2).sum()])

    grads = torch.stack([2 * (theta - u), 2 * (theta - u), 2 * (theta + u)])
    return ProbeContext(
        step=0,
        epoch=0,
        task_names=["a", "b", "c"],
        losses=losses_at(theta),
        recorded=RecordedStep(gramian=(grads @ grads.T).double(), blocks=[grads]),
        grad_scale=1.0,
        batch={},
        shared=[theta],
        shared_names=["theta"],
        shared_lrs=[lr],
        task_losses=lambda replaced: losses_at(replaced.get("theta", theta)),
    )


def test_identical_tasks_help_and_opposed_tasks_hurt_exactly():
    u, lr = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.1
    probe = TaskAffinity(every=1)
    probe.observe(quadratic_context(torch.zeros(2, dtype=torch.float64), u, lr))
    z = probe.matrix()
    # at θ = 0 a's step moves θ to 2ηu: ‖2ηu − u‖² = (1 − 2η)²‖u‖², ‖2ηu + u‖² = (1 + 2η)²‖u‖²
    assert z[0, 1] == pytest.approx(1 - (1 - 2 * lr) ** 2)
    assert z[0, 0] == pytest.approx(z[0, 1])
    assert z[0, 2] == pytest.approx(1 - (1 + 2 * lr) ** 2)
    assert z[2, 0] == pytest.approx(1 - (1 + 2 * lr) ** 2)
    assert z[0, 1] > 0 > z[0, 2]
    # averaged over steps, entry by entry
    probe.observe(quadratic_context(0.5 * u, u, lr))
    second = 1 - ((0.5 * u + lr * u - u) ** 2).sum() / ((0.5 * u - u) ** 2).sum()
    assert probe.matrix()[0, 1] == pytest.approx((1 - (1 - 2 * lr) ** 2 + float(second)) / 2)
    assert probe.steps == 2


class Twins(Dataset):
    """TinyScenes with its class label given twice, as two tasks."""

    def __init__(self, n: int = 24) -> None:
        self.base = TinyScenes(n)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        item["targets"] = {**item["targets"], "twin": item["targets"]["cls"]}
        item["valid"] = {**item["valid"], "twin": True}
        return item


def twin_model() -> MultiTaskModel:
    torch.manual_seed(0)
    tasks = [
        TASKS.get("classification")("cls", num_classes=3),
        TASKS.get("classification")("twin", num_classes=3),
        TASKS.get("segmentation")("seg", num_classes=3),
    ]
    model = MultiTaskModel(tiny_backbone, tasks)
    _without_batch_norm(model)
    return model


@pytest.mark.parametrize("balancer", ["ew", "upgrad"])
def test_run_affinity_equals_a_plain_autograd_lookahead(balancer, tmp_path):
    model = twin_model()
    probe = TaskAffinity(every=3)
    trainer = Trainer(model, balancer, epochs=1, batch_size=8, lr=0.05, device="cpu", progress=False, run_dir=tmp_path)
    trainer.probes = [probe]
    seen = {}
    original = trainer._observe

    def observe(batch, losses):
        if probe.due(trainer.state.step):
            seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
            seen["batch"] = batch
        original(batch, losses)

    trainer._observe = observe
    trainer.fit(Twins(16))  # steps 0 and 1: measured at step 0 only
    z = probe.matrix()
    # the reference: the same lookahead by hand, with plain autograd gradients
    reference = twin_model()
    reference.load_state_dict(seen["weights"])
    batch = seen["batch"]
    shared = [p for p in reference.shared_parameters() if p.requires_grad]
    before = trainer.task_losses(reference(batch["image"]), batch)
    expected = np.zeros((3, 3))
    per_task = [
        torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True, materialize_grads=True)
        for loss in before
    ]
    for i, grads in enumerate(per_task):
        with torch.no_grad():
            for p, g in zip(shared, grads):
                p -= 0.05 * g
            after = trainer.task_losses(reference(batch["image"]), batch)
            for p, g in zip(shared, grads):
                p += 0.05 * g
        expected[i] = (1 - after / before).detach().numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-3, atol=1e-6)
    assert z[0, 1] > 0 and z[1, 0] > 0  # the twins help each other
    with open(tmp_path / AFFINITY_NAME) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step_task", "cls", "twin", "seg"]
    assert float(rows[1][2]) == pytest.approx(z[0, 1], rel=1e-4)


def test_every_must_be_positive():
    with pytest.raises(ConfigError, match="--every 0"):
        TaskAffinity(every=0)


def test_representation_mode_is_refused_up_front():
    with pytest.raises(ConfigError, match="balancer.mode=params"):
        Trainer(twin_model(), "mgda_ub", device="cpu", probes=[TaskAffinity(5)])
