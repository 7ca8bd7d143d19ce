"""The engine on a real multi-task model whose shared representation is a backbone's nested stage outputs
(the second stage is computed from the first, and the FPN heads read both): per-task gradients and
updates must equal plain autograd on the uncut model, which double counting through the later stage
would break."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mtlvision.balancers import GradientEngine, Needs
from mtlvision.models.multitask import CutRepresentation
from tests.balancers.test_engine import Probe
from tests.engine.tinyrun import TinyScenes, tiny_model

WEIGHTS = torch.tensor([0.5, 1.5, 2.0])


def _losses(predictions: dict) -> torch.Tensor:
    return torch.stack([(p.float() ** 2).mean() * (t + 1) for t, p in enumerate(predictions.values())])


def _images() -> torch.Tensor:
    return torch.stack([TinyScenes(6)[i]["image"] for i in range(6)])


def _reference(weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-task Jacobian of the shared parameters and the gradient of Σ w_t L_t, by plain autograd."""
    model = tiny_model()
    losses = _losses(model(_images()))
    shared = list(model.shared_parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared, retain_graph=True)]) for l in losses]
    total = torch.autograd.grad((weights * losses).sum(), list(model.parameters()))
    return torch.stack(rows), list(total)


def _engine_step(jacobian: str, mode: str, needs: Needs) -> tuple[Probe, list[torch.Tensor]]:
    model = tiny_model()
    predictions, cut = model.forward_cut(_images())
    assert isinstance(cut, CutRepresentation) and len(cut.trunk) == 2
    probe = Probe(needs, WEIGHTS)
    engine = GradientEngine(
        list(model.shared_parameters()), list(model.task_specific_parameters()), cut.inputs, trunk=cut.trunk,
        mode=mode, jacobian=jacobian,
    )
    engine.backward(_losses(predictions), probe)
    return probe, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("jacobian", ["batched", "loop"])
def test_per_task_jacobian_through_the_cut_equals_plain_autograd(jacobian: str) -> None:
    expected_jacobian, expected_grads = _reference(WEIGHTS)
    probe, grads = _engine_step(jacobian, "params", Needs.JACOBIAN)
    assert_close(probe.seen["jacobian"], expected_jacobian, rtol=1e-4, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("needs", [Needs.LOSSES, Needs.JACOBIAN])
def test_weighted_updates_through_the_cut_equal_plain_autograd(needs: Needs) -> None:
    _, expected_grads = _reference(WEIGHTS)
    _, grads = _engine_step("batched", "representation", needs)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_trunk_must_match_the_representation() -> None:
    model = tiny_model()
    _, cut = model.forward_cut(_images())
    with pytest.raises(Exception, match="trunk tensors must match"):
        GradientEngine(list(model.shared_parameters()), [], cut.inputs[:1], trunk=cut.trunk)
