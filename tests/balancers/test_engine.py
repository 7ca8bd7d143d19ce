"""The gradient engine against plain autograd on a small conv net with BatchNorm."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from mtlvision.balancers.base import Balancer, Needs, TaskGradients, Update
from mtlvision.balancers.engine import GradientEngine
from mtlvision.errors import ConfigError, InternalError

T = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)) for _ in range(T - 1)]
            + [nn.Conv2d(8, 1, 1)]
        )

    def losses(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rep = self.trunk(x)
        outs = [head(rep) for head in self.heads]
        losses = torch.stack(
            [
                nn.functional.cross_entropy(outs[0], torch.tensor([0, 1, 2, 3])),
                outs[1].pow(2).mean() * 3.0,
                (outs[2] - 0.5).abs().mean(),
            ]
        )
        return rep, losses


def setup(seed: int = 0) -> tuple[Net, Tensor]:
    torch.manual_seed(seed)
    return Net(), torch.randn(4, 3, 8, 8)


def shared(net: Net) -> list[nn.Parameter]:
    return list(net.trunk.parameters())


def heads(net: Net) -> list[nn.Parameter]:
    return list(net.heads.parameters())


def reference_jacobian(net: Net, x: Tensor) -> Tensor:
    _, losses = net.losses(x)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared(net), retain_graph=True)]) for loss in losses
    ]
    return torch.stack(rows)


class Probe(Balancer):
    """Records what it was given and answers with fixed weights (and optionally a direction)."""

    supports_representation = True

    def __init__(self, needs: Needs, weights: Tensor, direction: Tensor | None = None, ask: str = "jacobian") -> None:
        super().__init__()
        self.needs_ = needs
        self.w = weights
        self.direction = direction
        self.ask = ask
        self.seen: dict[str, Tensor] = {}

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return self.needs_

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        if grads is not None and self.ask:
            self.seen[self.ask] = getattr(grads, self.ask)()
        return Update(weights=self.w, direction=self.direction)


def grads_of(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def weighted_reference(net: Net, x: Tensor, w: Tensor) -> list[Tensor]:
    net.zero_grad(set_to_none=True)
    _, losses = net.losses(x)
    (w * losses).sum().backward()
    out = grads_of(shared(net) + heads(net))
    net.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("path", ["batched", "loop"])
@pytest.mark.parametrize("with_rep", [False, True])
def test_jacobian_rows_equal_per_task_autograd(path: str, with_rep: bool) -> None:
    net, x = setup()
    expected = reference_jacobian(net, x)
    rep, losses = net.losses(x)
    probe = Probe(Needs.JACOBIAN, torch.ones(T))
    engine = GradientEngine(shared(net), heads(net), rep if with_rep else None, mode="params", jacobian=path)
    engine.backward(losses, probe)
    assert probe.seen["jacobian"].shape == expected.shape
    torch.testing.assert_close(probe.seen["jacobian"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gramian_is_g_gt(dtype: torch.dtype) -> None:
    net, x = setup(1)
    jac = reference_jacobian(net, x).double()
    _, losses = net.losses(x)
    probe = Probe(Needs.GRAMIAN, torch.ones(T), ask="gramian")
    GradientEngine(shared(net), heads(net), gramian_dtype=dtype).backward(losses, probe)
    assert probe.seen["gramian"].dtype == dtype
    torch.testing.assert_close(probe.seen["gramian"].double(), jac @ jac.T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ask", ["jacobian", "gramian", ""])
@pytest.mark.parametrize("with_rep", [False, True])
def test_weights_equal_backward_of_weighted_sum(ask: str, with_rep: bool) -> None:
    net, x = setup(2)
    w = torch.tensor([0.3, 1.7, 0.9])
    expected = weighted_reference(net, x, w)
    rep, losses = net.losses(x)
    engine = GradientEngine(shared(net), heads(net), rep if with_rep else None, mode="params")
    engine.backward(losses, Probe(Needs.JACOBIAN, w, ask=ask))
    for got, want in zip(grads_of(shared(net) + heads(net)), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_loss_weighting_gets_grad_of_weighted_sum_and_accumulates() -> None:
    net, x = setup(3)
    w = torch.tensor([2.0, 0.5, 1.0])
    expected = weighted_reference(net, x, w)
    for _ in range(2):  # a second step accumulates, like .backward()
        _, losses = net.losses(x)
        GradientEngine(shared(net), heads(net)).backward(losses, Probe(Needs.LOSSES, w))
    for got, want in zip(grads_of(shared(net) + heads(net)), expected):
        torch.testing.assert_close(got, 2 * want, rtol=1e-5, atol=1e-6)


def test_direction_goes_to_shared_and_heads_get_weighted_sum() -> None:
    net, x = setup(4)
    w = torch.tensor([0.2, 0.3, 0.5])
    expected = weighted_reference(net, x, w)
    numel = sum(p.numel() for p in shared(net))
    direction = torch.linspace(-1, 1, numel)
    _, losses = net.losses(x)
    GradientEngine(shared(net), heads(net)).backward(losses, Probe(Needs.JACOBIAN, w, direction=direction))
    got_shared = torch.cat([g.reshape(-1) for g in grads_of(shared(net))])
    torch.testing.assert_close(got_shared, direction)
    for got, want in zip(grads_of(heads(net)), expected[len(shared(net)) :]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_representation_mode_follows_the_chain_rule() -> None:
    net, x = setup(5)
    rep, losses = net.losses(x)
    per_task = torch.stack([torch.autograd.grad(loss, rep, retain_graph=True)[0].reshape(-1) for loss in losses])
    direction = torch.randn(rep.numel())
    chain = torch.autograd.grad(rep, shared(net), grad_outputs=direction.view_as(rep), retain_graph=True)
    w = torch.tensor([1.0, 2.0, 3.0])
    head_expected = torch.autograd.grad((w * losses).sum(), heads(net), retain_graph=True)
    probe = Probe(Needs.JACOBIAN, w, direction=direction)
    GradientEngine(shared(net), heads(net), rep).backward(losses, probe)
    torch.testing.assert_close(probe.seen["jacobian"], per_task)
    for got, want in zip(grads_of(shared(net)), chain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_of(heads(net)), head_expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_representation_mode_weights_equal_weighted_sum() -> None:
    net, x = setup(6)
    w = torch.tensor([0.5, 0.1, 2.0])
    expected = weighted_reference(net, x, w)
    rep, losses = net.losses(x)
    GradientEngine(shared(net), heads(net), rep).backward(losses, Probe(Needs.GRAMIAN, w, ask="gramian"))
    for got, want in zip(grads_of(shared(net) + heads(net)), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_each_task_walks_only_its_own_head() -> None:
    calls = [0] * T

    def counter(t: int):
        def hook(module: nn.Module, grad_in: object, grad_out: object) -> None:
            calls[t] += 1

        return hook

    net, x = setup(7)
    for t, head in enumerate(net.heads):
        head.register_full_backward_hook(counter(t))
    rep, losses = net.losses(x)
    GradientEngine(shared(net), heads(net), rep).backward(losses, Probe(Needs.JACOBIAN, torch.ones(T)))
    assert calls == [1] * T


def test_reduce_hook_sees_the_jacobian() -> None:
    net, x = setup(8)
    expected = reference_jacobian(net, x)
    _, losses = net.losses(x)
    probe = Probe(Needs.GRAMIAN, torch.ones(T), ask="gramian")
    GradientEngine(shared(net), heads(net), reduce=lambda m: 2.0 * m).backward(losses, probe)
    torch.testing.assert_close(probe.seen["gramian"], 4.0 * expected @ expected.T, rtol=1e-5, atol=1e-6)


def test_jacobian_is_float32_under_autocast() -> None:
    net, x = setup(9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rep, losses = net.losses(x)
    probe = Probe(Needs.JACOBIAN, torch.ones(T))
    GradientEngine(shared(net), heads(net), rep, mode="params").backward(losses.float(), probe)
    assert probe.seen["jacobian"].dtype == torch.float32
    assert torch.isfinite(probe.seen["jacobian"]).all()


def test_extra_loss_reaches_only_the_balancer_parameters() -> None:
    class Learnable(Balancer):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.zeros(T))

        def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
            return Update(weights=self.s.exp().detach(), extra_loss=(self.s.exp() * losses.detach()).sum())

    net, x = setup(10)
    _, losses = net.losses(x)
    bal = Learnable()
    GradientEngine(shared(net), heads(net)).backward(losses, bal)
    torch.testing.assert_close(bal.s.grad, losses.detach())


def test_clear_errors() -> None:
    net, x = setup(11)
    rep, losses = net.losses(x)

    class NoRep(Probe):
        supports_representation = False

    with pytest.raises(ConfigError, match="representation"):
        GradientEngine(shared(net), heads(net), rep).backward(losses, NoRep(Needs.GRAMIAN, torch.ones(T)))
    with pytest.raises(ConfigError, match="no shared parameters"):
        GradientEngine([], heads(net)).backward(losses, Probe(Needs.GRAMIAN, torch.ones(T)))
    with pytest.raises(InternalError, match="direction"):
        GradientEngine(shared(net), heads(net)).backward(
            losses, Probe(Needs.JACOBIAN, torch.ones(T), direction=torch.ones(3))
        )
    with pytest.raises(ConfigError, match="mode"):
        GradientEngine(shared(net), heads(net), mode="trunk")  # type: ignore[arg-type]


def test_op_without_batching_rule_raises_clear_error_and_loop_path_works() -> None:
    class ViaNumpy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
            return x * 2

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
            return torch.from_numpy(grad.numpy() * 2)

    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    heads_ = nn.ModuleList([nn.Linear(3, 1) for _ in range(2)])

    def losses() -> Tensor:
        rep = ViaNumpy.apply(lin(torch.randn(5, 3)))
        return torch.stack([h(rep).pow(2).mean() for h in heads_])

    with pytest.raises(ConfigError, match="jacobian='loop'"):
        GradientEngine(list(lin.parameters()), list(heads_.parameters())).backward(
            losses(), Probe(Needs.JACOBIAN, torch.ones(2))
        )
    probe = Probe(Needs.JACOBIAN, torch.ones(2))
    GradientEngine(list(lin.parameters()), list(heads_.parameters()), jacobian="loop").backward(losses(), probe)
    assert probe.seen["jacobian"].shape == (2, 12)


@pytest.mark.parametrize("with_rep", [False, True])
@pytest.mark.parametrize("release", [False, True])
def test_jacobian_blocks_cover_the_jacobian_in_order(with_rep: bool, release: bool) -> None:
    net, x = setup(12)
    expected = reference_jacobian(net, x)
    rep, losses = net.losses(x)
    seen: list[tuple[slice, Tensor]] = []

    class Blocks(Probe):
        def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
            assert grads is not None and grads.num_columns == expected.shape[1]
            seen.extend((columns, block.clone()) for columns, block in grads.jacobian_blocks(release=release))
            if release:
                with pytest.raises(InternalError, match="released"):
                    grads.gramian()
            return Update(weights=torch.ones(T), direction=torch.zeros(expected.shape[1]))

    engine = GradientEngine(shared(net), heads(net), rep if with_rep else None, mode="params")
    engine.backward(losses, Blocks(Needs.JACOBIAN, torch.ones(T)))
    assert [p.numel() for p in shared(net)] == [block.shape[1] for _, block in seen]
    assert seen[0][0].start == 0 and all(a.stop == b.start for (a, _), (b, _) in itertools.pairwise(seen))
    torch.testing.assert_close(torch.cat([block for _, block in seen], dim=1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["db_mtl", "moco", "excess_mtl", "graddrop"])
def test_blockwise_stateful_methods_equal_their_matrix_form(name: str) -> None:
    """DB-MTL, MoCo and ExcessMTL update their [T, P] state block by block in place through the engine, and
    GradDrop computes its direction block by block: over three steps, the same updates as on the whole G."""
    from mtlvision.balancers import get
    from mtlvision.balancers.aggregate import MatrixGradients

    net, x = setup(13)
    through_engine, on_matrix = get(name), get(name)
    through_engine.setup(T), on_matrix.setup(T)
    for step in range(3):
        x_step = x + 0.1 * step
        jacobian = reference_jacobian(net, x_step)
        _, losses = net.losses(x_step)
        torch.manual_seed(step)
        expected = on_matrix.balance(losses.detach(), MatrixGradients(jacobian))
        want = expected.direction if expected.direction is not None else expected.weights.float() @ jacobian
        net.zero_grad(set_to_none=True)
        _, losses = net.losses(x_step)
        torch.manual_seed(step)
        update = GradientEngine(shared(net), heads(net)).backward(losses, through_engine)
        got = torch.cat([p.grad.reshape(-1) for p in shared(net)])
        torch.testing.assert_close(update.weights.float(), expected.weights.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)
