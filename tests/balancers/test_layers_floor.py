"""The layer path's cheaper ways (issue 24) give the gradients of the plain per-task loop: a convolution's T
weight gradients by the unfolded GEMM or by the convolution's own kernel (forced or measured), the update
of a layer whose weight gradients the Gramian formed read from them instead of another weight gradient, and
a layer whose rule would take the kernel left to the vmapped backward itself."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mtlvision import balancers
from mtlvision.balancers import GradientEngine, LayerTaps
from mtlvision.balancers.jacobian.layers import LayerGradients
from mtlvision.balancers.jacobian.vmap import BACKWARD_VMAP
from mtlvision.balancers.layers import MEASURED_WAYS, RULES, Conv2dRule, measured_way
from mtlvision.errors import ConfigError
from tests.tolerance import assert_within_roundoff


class Trunk(nn.Module):
    """conv (run twice) → BatchNorm → strided conv → a frozen conv (parameters without grad) → linear, then
    three heads: many places per early layer, so that those layers keep their weight gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.frozen = nn.Conv2d(6, 6, 1)
        self.frozen.requires_grad_(False)
        self.fc = nn.Linear(6, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 3), nn.Linear(5, 2)])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("heads")]

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        x = torch.relu(self.frozen(self.down(self.norm(x))))
        return torch.tanh(self.fc(x.mean(dim=(2, 3))))

    def losses(self, rep: Tensor) -> Tensor:
        return torch.stack([(head(rep) - t).pow(2).mean() for t, head in enumerate(self.heads)])


#: the most float32 products one entry of the layer path sums: the conv's two calls over 4 images of 12×12
TERMS = 2 * 4 * 12 * 12


def step(path: str, name: str) -> tuple[list[Tensor], list[str], list[str]]:
    """One engine step of balancer ``name`` on path ``path``: every parameter's ``.grad``, the tapped
    layers whose weight gradients were kept for the update and those handed to the vmapped backward."""
    torch.manual_seed(0)
    net = Trunk().double()
    x = torch.randn(4, 4, 12, 12, dtype=torch.float64)
    taps = LayerTaps(net, net.shared_parameters()) if path == "layers" else None
    if taps is not None:
        with taps.recording():
            rep = net(x)
    else:
        rep = net(x)
    balancer = balancers.get(name).double()
    balancer.setup(3)
    engine = GradientEngine(
        net.shared_parameters(), list(net.heads.parameters()), mode="params", jacobian=path, taps=taps
    )
    held: list[str] = []
    handed: list[str] = []
    hold, hand = LayerGradients._hold, LayerGradients._hand_to_autograd

    def spy(self: LayerGradients, module: nn.Module, grads: list[Tensor]) -> None:
        hold(self, module, grads)
        if module in self._held:
            held.append(taps.modules[module] if taps is not None else "")

    def spy_hand(self: LayerGradients) -> None:
        before = list(self._groups)
        hand(self)
        handed.extend(taps.modules[m] for m in before if m not in self._groups)  # type: ignore[union-attr]

    LayerGradients._hold = spy  # type: ignore[method-assign]
    LayerGradients._hand_to_autograd = spy_hand  # type: ignore[method-assign]
    try:
        engine.backward(net.losses(rep), balancer)
    finally:
        LayerGradients._hold, LayerGradients._hand_to_autograd = hold, hand  # type: ignore[method-assign]
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()], held, handed


@pytest.mark.parametrize("backward", ["func", "autograd"])  # the handed-back layers under either vmapped backward
@pytest.mark.parametrize("way", ["gemm", "kernel"])
@pytest.mark.parametrize("name", ["mgda", "upgrad", "pcgrad", "cagrad", "imtl_g", "nash_mtl"])
def test_layer_path_with_kept_weight_gradients_equals_the_loop(name: str, way: str, backward: str, monkeypatch) -> None:
    monkeypatch.setattr(RULES[nn.Conv2d], "weight_way", way)
    monkeypatch.setitem(BACKWARD_VMAP, "way", backward)
    want, _, _ = step("loop", name)
    got, held, handed = step("layers", name)
    if way == "gemm":  # the update of those layers came from their kept gradients
        assert held == ["conv", "down"] and handed == []
    else:  # autograd formed their weight gradients in the backward (its own kernel)
        assert held == [] and handed == ["conv", "down"]
    for g, w in zip(got, want, strict=True):
        assert_within_roundoff(g, w, w.abs().max(), TERMS, torch.float32)
    assert not torch.count_nonzero(got[list(dict(Trunk().named_parameters())).index("frozen.weight")])


def test_both_ways_to_the_weight_gradients_agree_and_the_choice_is_measured_once() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    grads = torch.randn(4, *conv(x).shape)
    gemm, kernel = Conv2dRule("gemm"), Conv2dRule("kernel")
    magnitude = gemm.task_gradients(conv, x.abs(), grads.abs())
    for a, b, m in zip(gemm.task_gradients(conv, x, grads), kernel.task_gradients(conv, x, grads), magnitude):
        assert_within_roundoff(a, b, m, 2 * gemm.places(conv, grads), torch.float32)
    calls: list[str] = []

    def run(way: str) -> Tensor:
        calls.append(way)
        return torch.zeros(1)

    key = ("test", id(calls))
    chosen = measured_way(key, run)
    assert chosen in ("gemm", "kernel") and MEASURED_WAYS.pop(key) == chosen
    assert sorted(calls) == ["gemm"] * 3 + ["kernel"] * 3  # a warm-up and two timed calls each
    measured = Conv2dRule()
    measured.task_gradients(conv, x, grads)
    assert MEASURED_WAYS[measured._way_key(conv, x.float(), grads.float())] in ("gemm", "kernel")
    with pytest.raises(ConfigError, match="weight_way"):
        Conv2dRule("im2col")
