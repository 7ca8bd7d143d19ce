"""Every gradient method through the real GradientEngine on a tiny two-head model: the shared ``.grad`` is
the method's aggregation of the per-task gradients, and representation mode runs where it is defined."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mtlvision.balancers import GradientEngine, aggregate, get
from mtlvision.balancers.aggregate import gradient_methods


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = self.trunk(x)
        return torch.stack([((head(rep)[:, 0] - y[:, t]) ** 2).mean() for t, head in enumerate(self.heads)]), rep


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)


def shared_jacobian(model: TinyModel) -> torch.Tensor:
    losses, _ = model.losses(*data())
    rows = []
    for t in range(3):
        grads = torch.autograd.grad(losses[t], list(model.trunk.parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", gradient_methods())
def test_engine_applies_the_aggregation(name: str) -> None:
    model = TinyModel()
    G = shared_jacobian(model)
    torch.manual_seed(3)
    expected = aggregate(name, G)
    balancer = get(name)
    balancer.setup(3)
    losses, _ = model.losses(*data())
    engine = GradientEngine(list(model.trunk.parameters()), list(model.heads.parameters()))
    torch.manual_seed(3)
    update = engine.backward(losses, balancer)
    got = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert update.weights.shape == (3,) and torch.isfinite(update.weights).all()


@pytest.mark.parametrize("name", [n for n in gradient_methods() if get(n).supports_representation])
def test_representation_mode_runs(name: str) -> None:
    model = TinyModel()
    balancer = get(name)
    balancer.setup(3)
    losses, rep = model.losses(*data())
    engine = GradientEngine(list(model.trunk.parameters()), list(model.heads.parameters()), rep)
    engine.backward(losses, balancer)
    grads = [p.grad for p in model.trunk.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
