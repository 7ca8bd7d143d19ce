"""Gradient-conflict diagnostics: cosines, norms and conflict share against plain autograd gradients."""

from __future__ import annotations

import csv
import math
from itertools import combinations

import pytest
import torch

from mtlvision.engine.diagnostics import DIAGNOSTICS_NAME, GradientDiagnostics, gradient_statistics
from mtlvision.engine.trainer import Trainer
from mtlvision.errors import ConfigError

from .tinyrun import TinyScenes, tiny_model


class Spy(GradientDiagnostics):
    """Diagnostics that also keep each observed step's context, to recompute the gradients by autograd."""

    def __init__(self, every: int) -> None:
        super().__init__(every)
        self.contexts = []

    def observe(self, context):
        self.contexts.append(context)
        return super().observe(context)


def autograd_reference(model, trainer, batch) -> torch.Tensor:
    """``G`` [T, P]: each task's own autograd gradient of the shared parameters, one backward per task."""
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    losses = trainer.task_losses(model(batch["image"]), batch)
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True, materialize_grads=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


@pytest.mark.parametrize("balancer", ["ew", "upgrad", "pcgrad"])
def test_cosines_equal_those_of_autograd_gradients(balancer):
    model = tiny_model()
    spy = Spy(every=2)
    trainer = Trainer(model, balancer, epochs=1, batch_size=8, device="cpu", progress=False, probes=[spy])
    snapshots = {}  # the weights and batch of each diagnosed step, before its update
    original_observe = trainer._observe

    def observe(batch, losses):
        if spy.due(trainer.state.step):
            snapshots[trainer.state.step] = ({k: v.clone() for k, v in model.state_dict().items()}, batch)
        original_observe(batch, losses)

    trainer._observe = observe
    trainer.fit(TinyScenes(24))
    assert [row["step"] for row in spy.rows] == [0.0, 2.0]
    names = list(trainer.tasks)
    for row in spy.rows:
        weights, batch = snapshots[int(row["step"])]
        reference = tiny_model()
        reference.load_state_dict(weights)
        g = autograd_reference(reference, trainer, batch)
        norms = g.norm(dim=1)
        for i, name in enumerate(names):
            assert row[f"norm/{name}"] == pytest.approx(float(norms[i]), rel=1e-4)
        negative = 0
        for i, j in combinations(range(len(names)), 2):
            cos = float(g[i] @ g[j] / (norms[i] * norms[j]))
            assert row[f"cos/{names[i]}~{names[j]}"] == pytest.approx(cos, abs=1e-5)
            negative += cos < 0
        assert row["conflict_share"] == pytest.approx(negative / 3)


def test_statistics_of_a_known_gramian():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    values = gradient_statistics(g @ g.T, ["a", "b", "c", "d"])
    assert values["cos/a~b"] == pytest.approx(-1.0)
    assert values["cos/a~c"] == pytest.approx(1 / math.sqrt(2))
    assert values["norm/c"] == pytest.approx(math.sqrt(2))
    assert math.isnan(values["cos/a~d"])  # a zero gradient has no direction; left out of the share
    assert values["cos/b~c"] == pytest.approx(-1 / math.sqrt(2))
    assert values["conflict_share"] == pytest.approx(2 / 3)  # of the pairs with a direction, a~b and b~c


def test_run_folder_history_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = tiny_model()
    trainer = Trainer(
        model,
        "ew",
        epochs=2,
        batch_size=8,
        device="cpu",
        progress=False,
        run_dir=run_dir,
        probes=[GradientDiagnostics(2)],
    )
    trainer.fit(TinyScenes(24))
    with open(run_dir / DIAGNOSTICS_NAME) as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["step"])) for r in rows] == [0, 2, 4]  # 3 steps per epoch, every 2nd
    epochs = trainer.state.history
    first = [float(r["cos/cls~seg"]) for r in rows if r["epoch"] == "1.0"]
    assert epochs[0]["diag/cos/cls~seg"] == pytest.approx(sum(first) / len(first))
    assert epochs[1]["diag/steps"] == 1.0
    # a resumed trainer continues the same record
    again = Trainer(
        tiny_model(), "ew", epochs=3, batch_size=8, device="cpu", progress=False, run_dir=run_dir,
        probes=[GradientDiagnostics(2)],
    )  # fmt: skip
    again.fit(TinyScenes(24), resume=True)
    assert [row["step"] for row in again.probes[0].rows] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_accumulation_is_refused():
    with pytest.raises(ConfigError, match="train.accumulate=2"):
        Trainer(tiny_model(), "ew", accumulate=2, device="cpu", probes=[GradientDiagnostics(5)])


@pytest.mark.parametrize("balancer", ["ew", "dwa", "upgrad"])
def test_recording_does_not_change_training(balancer):
    finals = []
    for probes in ([], [GradientDiagnostics(1)]):
        model = tiny_model()
        Trainer(model, balancer, epochs=2, batch_size=8, device="cpu", progress=False, probes=probes).fit(
            TinyScenes(24)
        )
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-6)
