"""The engine on a real multi-task model whose shared representation is a backbone's nested stage outputs
(the second stage is computed from the first, and the FPN heads read both): per-task gradients and
updates must equal plain autograd on the uncut model, which double counting through the later stage
would break."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch.testing import assert_close

from mtlvision.balancers import GradientEngine, LayerTaps, Needs
from mtlvision.models.multitask import CutRepresentation
from tests.balancers.test_engine import Probe
from tests.engine.tinyrun import TinyScenes, tiny_model

WEIGHTS = torch.tensor([0.5, 1.5, 2.0])


def _losses(predictions: dict) -> torch.Tensor:
    return torch.stack([(p.float() ** 2).mean() * (t + 1) for t, p in enumerate(predictions.values())])


def _images() -> torch.Tensor:
    return torch.stack([TinyScenes(6)[i]["image"] for i in range(6)])


def _model(frozen_stages: int = 0):
    model = tiny_model()
    model.freeze_backbone_stages(frozen_stages)
    return model


def _reference(weights: torch.Tensor, frozen_stages: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-task Jacobian of the shared parameters and the gradient of Σ w_t L_t, by plain autograd."""
    model = _model(frozen_stages)
    losses = _losses(model(_images()))
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
    total = torch.autograd.grad((weights * losses).sum(), [p for p in model.parameters() if p.requires_grad])
    return torch.stack(rows), list(total)


def _engine_step(
    jacobian: str, mode: str, needs: Needs, frozen_stages: int = 0, ask: str = "jacobian"
) -> tuple[Probe, list[torch.Tensor]]:
    model = _model(frozen_stages)
    taps = LayerTaps(model, model.shared_parameters()) if jacobian == "layers" else None
    with taps.recording() if taps is not None else nullcontext():
        predictions, cut = model.forward_cut(_images())
    assert isinstance(cut, CutRepresentation) and len(cut.trunk) == 2
    probe = Probe(needs, WEIGHTS, ask=ask)
    engine = GradientEngine(
        list(model.shared_parameters()),
        list(model.task_specific_parameters()),
        cut.inputs,
        trunk=cut.trunk,
        mode=mode,
        jacobian=jacobian,
        taps=taps,
    )
    engine.backward(_losses(predictions), probe)
    return probe, [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("frozen_stages", [0, 1])
@pytest.mark.parametrize("jacobian", ["batched", "loop", "layers"])
def test_per_task_jacobian_through_the_cut_equals_plain_autograd(jacobian: str, frozen_stages: int) -> None:
    expected_jacobian, expected_grads = _reference(WEIGHTS, frozen_stages)
    probe, grads = _engine_step(jacobian, "params", Needs.JACOBIAN, frozen_stages)
    assert_close(probe.seen["jacobian"], expected_jacobian, rtol=1e-4, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("frozen_stages", [0, 1])
def test_layer_gramian_and_update_through_the_cut_equal_plain_autograd(frozen_stages: int) -> None:
    """Path "layers" for a Gramian method: K from activations and per-layer weight gradients, the update from
    each layer's weighted output gradient; never the Jacobian itself."""
    expected_jacobian, expected_grads = _reference(WEIGHTS, frozen_stages)
    probe, grads = _engine_step("layers", "params", Needs.GRAMIAN, frozen_stages, ask="gramian")
    assert_close(probe.seen["gramian"], expected_jacobian @ expected_jacobian.T, rtol=1e-4, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("frozen_stages", [0, 1])
@pytest.mark.parametrize("needs", [Needs.LOSSES, Needs.JACOBIAN])
def test_weighted_updates_through_the_cut_equal_plain_autograd(needs: Needs, frozen_stages: int) -> None:
    _, expected_grads = _reference(WEIGHTS, frozen_stages)
    _, grads = _engine_step("batched", "representation", needs, frozen_stages)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_trunk_must_match_the_representation() -> None:
    model = tiny_model()
    _, cut = model.forward_cut(_images())
    with pytest.raises(Exception, match="trunk tensors must match"):
        GradientEngine(list(model.shared_parameters()), [], cut.inputs[:1], trunk=cut.trunk)
