"""Loss-weighting methods: defining properties from their papers, state round-trips, extreme losses."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlvision.balancers import BALANCERS, GradientEngine, get
from mtlvision.balancers.base import Balancer, Needs, TaskGradients, Update
from mtlvision.balancers.weighting import WeightingError
from mtlvision.errors import ConfigError, InternalError, MtlvisionError

OURS = [
    "ew",
    "fixed",
    "uw",
    "dwa",
    "gradnorm",
    "rlw",
    "gls",
    "imtl_l",
    "famo",
    "db_mtl",
    "stch",
    "excess_mtl",
    "go4align",
    "ldc_mtl",
]


class FakeGrads(TaskGradients):
    def __init__(self, jacobian: Tensor) -> None:
        self._jacobian = jacobian

    @property
    def num_tasks(self) -> int:
        return self._jacobian.shape[0]

    def jacobian(self) -> Tensor:
        return self._jacobian

    def gramian(self) -> Tensor:
        return self._jacobian @ self._jacobian.T


def build(name: str, num_tasks: int) -> Balancer:
    balancer = get(name, weights=[1.0] * num_tasks) if name == "fixed" else get(name)
    balancer.setup(num_tasks)
    return balancer


def drive(balancer: Balancer, losses: Tensor, jacobian: Tensor | None = None) -> Update:
    """One training step as the trainer runs it, without a model."""
    grads = None
    if balancer.needs is not Needs.LOSSES:
        grads = FakeGrads(jacobian if jacobian is not None else torch.randn(losses.numel(), 5))
    update = balancer.balance(losses, grads)
    if balancer.needs_post_step_losses:
        balancer.after_step(losses * 0.9)
    return update


def run_epochs(balancer: Balancer, num_tasks: int, epochs: int, steps: int = 3, seed: int = 0) -> list[Update]:
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for epoch in range(epochs):
        for _ in range(steps):
            losses = torch.rand(num_tasks, generator=gen, dtype=torch.float64) + 0.1 / (epoch + 1)
            jac = torch.randn(num_tasks, 5, generator=gen)
            updates.append(drive(balancer, losses.float(), jac))
        balancer.on_epoch_end(torch.rand(num_tasks, generator=gen) + 0.5)
    return updates


def test_every_method_is_registered_with_description_and_citation() -> None:
    for name in OURS:
        entry = BALANCERS.entry(name)
        assert entry.description and entry.citation


@pytest.mark.parametrize("name", OURS)
def test_weights_are_finite_and_positive_over_several_epochs(name: str) -> None:
    torch.manual_seed(0)
    for update in run_epochs(build(name, 3), 3, epochs=7):
        assert update.weights.shape == (3,)
        assert torch.isfinite(update.weights).all() and (update.weights > 0).all()
        if update.direction is not None:
            assert torch.isfinite(update.direction).all()


@pytest.mark.parametrize("name", OURS)
def test_state_round_trips_through_a_weights_only_checkpoint(name: str) -> None:
    torch.manual_seed(1)
    original = build(name, 3)
    run_epochs(original, 3, epochs=6, seed=1)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = build(name, 3)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.manual_seed(2)
    expected = run_epochs(original, 3, epochs=2, seed=2)
    torch.manual_seed(2)
    got = run_epochs(restored, 3, epochs=2, seed=2)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a.weights, b.weights)
        if a.direction is not None:
            torch.testing.assert_close(a.direction, b.direction)


@pytest.mark.parametrize("name", OURS)
def test_one_task_is_plain_gradient_descent_up_to_a_positive_scale(name: str) -> None:
    torch.manual_seed(3)
    balancer = build(name, 1)
    g = torch.randn(1, 5)
    for epoch in range(6):
        update = drive(balancer, torch.tensor([0.7 + 0.1 * epoch]), g)
        assert update.weights.item() > 0
        if update.direction is not None:
            cosine = torch.nn.functional.cosine_similarity(update.direction, g[0], dim=0)
            assert cosine.item() == pytest.approx(1.0, abs=1e-6)
        balancer.on_epoch_end(torch.tensor([0.7 + 0.1 * epoch]))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(OURS),
    exponents=st.lists(st.one_of(st.floats(-10, 15), st.none()), min_size=2, max_size=4),
)
@example(name="go4align", exponents=[7.0, 7.0])  # its risk update once underflowed to 0/0 here
def test_extreme_and_zero_losses_give_finite_weights_or_a_clear_error(name: str, exponents: list[float | None]) -> None:
    losses = torch.tensor([0.0 if e is None else 10.0**e for e in exponents])
    balancer = build(name, len(losses))
    try:
        for _epoch in range(6):
            update = drive(balancer, losses, torch.randn(len(losses), 4))
            balancer.on_epoch_end(losses)
    except WeightingError as exc:
        assert type(balancer).__name__ in str(exc)
        return
    assert torch.isfinite(update.weights).all() and (update.weights >= 0).all()


# ------------------------------------------------------------------------------------ defining properties
def test_uw_optimum_is_log_loss() -> None:
    """The UW objective is strictly convex in s (second derivative ½·e^(-s)·L > 0) and stationary at log L."""
    losses = torch.tensor([0.01, 1.0, 250.0], dtype=torch.float64)
    uw = get("uw", num_tasks=3).double()
    with torch.no_grad():
        uw.task_param.copy_(losses.log())
    update = uw.balance(losses, None)
    (slope,) = torch.autograd.grad(update.extra_loss, uw.task_param, create_graph=True)
    torch.testing.assert_close(slope, torch.zeros(3, dtype=torch.float64))
    curvature = torch.autograd.grad(slope.sum(), uw.task_param)[0]
    assert (curvature > 0).all()
    torch.testing.assert_close(update.weights, 0.5 / losses)


def test_imtl_l_scaled_losses_become_equal() -> None:
    losses = torch.tensor([0.02, 3.0, 40.0])
    imtl = build("imtl_l", 3)
    optimiser = torch.optim.Adam(imtl.parameters(), lr=0.05)
    for _ in range(1500):
        optimiser.zero_grad()
        imtl.balance(losses, None).extra_loss.backward()
        optimiser.step()
    scaled = imtl.balance(losses, None).weights * losses
    torch.testing.assert_close(scaled, torch.ones(3), atol=1e-3, rtol=1e-3)


def test_learnable_methods_refuse_to_run_without_setup() -> None:
    with pytest.raises(ConfigError, match="setup"):
        get("uw").balance(torch.ones(2), None)


def test_dwa_matches_its_formula_and_sums_to_t() -> None:
    dwa = build("dwa", 3)
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(dwa.balance(losses, None).weights, torch.ones(3))
    dwa.on_epoch_end(torch.tensor([1.0, 2.0, 4.0]))
    assert torch.equal(dwa.balance(losses, None).weights, torch.ones(3))
    dwa.on_epoch_end(torch.tensor([0.5, 1.8, 4.4]))
    ratio = np.array([0.5 / 1.0, 1.8 / 2.0, 4.4 / 4.0])
    expected = 3 * np.exp(ratio / 2) / np.exp(ratio / 2).sum()
    weights = dwa.balance(losses, None).weights
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    assert weights.sum().item() == pytest.approx(3.0)


def test_gls_weights_are_the_geometric_means_gradient() -> None:
    losses = torch.tensor([0.3, 2.0, 50.0, 1e-4], dtype=torch.float64, requires_grad=True)
    geometric_mean = losses.prod() ** (1 / 4)
    (expected,) = torch.autograd.grad(geometric_mean, losses)
    torch.testing.assert_close(build("gls", 4).balance(losses, None).weights, expected)


def test_gls_refuses_a_zero_loss() -> None:
    with pytest.raises(WeightingError, match="task 1"):
        build("gls", 2).balance(torch.tensor([1.0, 0.0]), None)


@pytest.mark.parametrize("name", ["famo", "stch", "db_mtl", "gradnorm", "uw", "dwa", "imtl_l", "excess_mtl"])
def test_a_zero_loss_from_a_batch_without_labels_is_accepted(name: str) -> None:
    balancer = build(name, 2)
    drive(balancer, torch.tensor([0.5, 1.0]))  # GradNorm's initial losses must be positive
    update = drive(balancer, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(update.weights).all() and (update.weights > 0).all()


def test_rlw_weights_lie_on_the_simplex_for_every_distribution() -> None:
    for distribution in ("normal", "uniform", "dirichlet"):
        rlw = get("rlw", distribution=distribution)
        weights = torch.stack([rlw.balance(torch.ones(4), None).weights for _ in range(50)])
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(50))
        assert weights.std(dim=0).min() > 0.01  # random, not constant
    with pytest.raises(ConfigError, match="distribution"):
        get("rlw", distribution="cauchy")


def test_famo_effective_weights_sum_to_one_and_are_its_objectives_gradient() -> None:
    famo = get("famo")
    losses = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64)
    famo.balance(losses, None)
    famo.after_step(torch.tensor([0.2, 1.9, 0.1], dtype=torch.float64))  # task 0 improved the most
    z = torch.softmax(famo.logits, dim=0)
    assert z[0] < z[2] and z[0] < z[1]  # so it loses weight
    variable = losses.clone().requires_grad_(True)
    c = (z / variable).sum().detach()
    (expected,) = torch.autograd.grad((z * variable.log()).sum() / c, variable)
    weights = famo.balance(losses, None).weights
    torch.testing.assert_close(weights, expected)
    assert weights.sum().item() == pytest.approx(1.0)


def test_famo_logit_step_is_adam_on_the_softmax_vjp() -> None:
    famo = get("famo", lr=0.1, gamma=0.0)
    old, new = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0])
    famo.balance(old, None)
    famo.after_step(new)
    # Adam's first step moves every coordinate by lr·sign(grad); the softmax VJP of Δlog L = [log 2, 0] at
    # z = [½, ½] is [+, −]: task 0's logit goes down by lr, task 1's up by lr.
    torch.testing.assert_close(famo.logits, torch.tensor([-0.1, 0.1], dtype=torch.float64), atol=1e-6, rtol=0)


def test_stch_weights_are_its_objectives_gradient_after_warmup() -> None:
    stch = get("stch", mu=0.5, warmup_epochs=1)
    warm = torch.tensor([1.0, 4.0, 0.25])
    torch.testing.assert_close(stch.balance(warm, None).weights, 1 / warm)  # gradient of Σ log L
    stch.on_epoch_end(warm)
    stch.balance(torch.tensor([2.0, 4.0, 0.5]), None)
    stch.balance(torch.tensor([4.0, 8.0, 1.0]), None)  # nadir = [3, 6, 0.75]
    stch.on_epoch_end(warm)
    losses = torch.tensor([1.5, 3.0, 1.5], dtype=torch.float64, requires_grad=True)
    nadir = torch.tensor([3.0, 6.0, 0.75], dtype=torch.float64)
    objective = 3 * 0.5 * torch.logsumexp((losses / nadir).log() / 0.5, dim=0)
    (expected,) = torch.autograd.grad(objective, losses)
    torch.testing.assert_close(stch.balance(losses.detach(), None).weights, expected)


def test_gradnorm_loss_matches_the_paper_and_renormalises() -> None:
    gradnorm = get("gradnorm", alpha=1.5, num_tasks=2)
    jac = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    first = gradnorm.balance(torch.tensor([1.0, 1.0]), FakeGrads(jac))
    assert torch.equal(first.weights, torch.ones(2))
    first.extra_loss.backward()
    # r = 1: target is the mean weighted norm 3; d/dw |w·n − 3| = sign·n
    torch.testing.assert_close(gradnorm.task_param.grad, torch.tensor([5.0, -1.0]))
    with torch.no_grad():
        gradnorm.task_param.copy_(torch.tensor([0.5, 2.5]))
    update = gradnorm.balance(torch.tensor([0.25, 1.0]), FakeGrads(jac))
    torch.testing.assert_close(update.weights, torch.tensor([1 / 3, 5 / 3]))  # renormalised to sum 2
    rate = torch.tensor([0.25, 1.0]) / 0.625
    weighted = torch.tensor([5 / 3, 5 / 3])
    expected = (weighted - weighted.mean() * rate**1.5).abs().sum()
    torch.testing.assert_close(update.extra_loss.detach(), expected)


def test_db_mtl_balances_gradient_magnitudes() -> None:
    db = get("db_mtl", beta=0.9)
    jac = torch.tensor([[1.0, 0.0, 0.0], [0.0, 10.0, 10.0]])
    losses = torch.tensor([0.5, 2.0])
    update = db.balance(losses, FakeGrads(jac))
    log_grads = 0.1 * jac / (losses[:, None] + 1e-8)  # (1 − β)·g/L at the first step
    norms = log_grads.norm(dim=1)
    expected = (norms.max() / norms) @ log_grads
    torch.testing.assert_close(update.direction, expected)
    torch.testing.assert_close(update.weights, 1 / (losses + 1e-8))
    second = db.balance(losses, FakeGrads(jac.flip(0)))
    average = 0.9 * log_grads + 0.1 * jac.flip(0) / (losses[:, None] + 1e-8)
    norms = average.norm(dim=1)
    torch.testing.assert_close(second.direction, (norms.max() / norms) @ average)


def test_excess_mtl_follows_exponentiated_ascent_on_excess_risk() -> None:
    ex = get("excess_mtl", step_size=0.5)
    g1 = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    g2 = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert torch.equal(ex.balance(torch.ones(2), FakeGrads(g1)).weights, torch.ones(2))
    weights = ex.balance(torch.ones(2), FakeGrads(g2)).weights
    s1 = g1**2
    risk1 = (g1**2 / (s1 + 1e-7).sqrt()).sum(1)
    s2 = s1 + g2**2
    risk2 = (g2**2 / (s2 + 1e-7).sqrt()).sum(1)
    unnormalised = torch.exp(0.5 * risk2 / risk1)
    torch.testing.assert_close(weights, 2 * unnormalised / unnormalised.sum())


# ------------------------------------------------------------------------------------ through the engine
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])

    def losses(self, x: Tensor) -> Tensor:
        rep = self.trunk(x)
        return torch.stack([(h(rep) - k).pow(2).mean() + 0.01 for k, h in enumerate(self.heads)])


@pytest.mark.parametrize("name", OURS)
def test_each_method_trains_a_tiny_model_through_the_engine(name: str) -> None:
    torch.manual_seed(4)
    model, balancer = Tiny(), build(name, 3)
    optimiser = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    x = torch.randn(16, 4)
    first = model.losses(x).detach()
    for _epoch in range(6):
        for _ in range(10):
            optimiser.zero_grad()
            losses = model.losses(x)
            GradientEngine(list(model.trunk.parameters()), list(model.heads.parameters())).backward(losses, balancer)
            optimiser.step()
            if balancer.needs_post_step_losses:
                with torch.no_grad():
                    balancer.after_step(model.losses(x))
        balancer.on_epoch_end(model.losses(x).detach())
    last = model.losses(x).detach()
    assert torch.isfinite(last).all()
    assert last.sum() < first.sum()


def test_famo_in_the_engine_gives_heads_the_weighted_gradient() -> None:
    torch.manual_seed(5)
    model, famo = Tiny(), get("famo")
    x = torch.randn(8, 4)
    losses = model.losses(x)
    update = GradientEngine(list(model.trunk.parameters()), list(model.heads.parameters())).backward(losses, famo)
    assert math.isclose(update.weights.sum().item(), 1.0, rel_tol=1e-6)
    for head, w, loss in zip(model.heads, update.weights, model.losses(x)):
        (expected,) = torch.autograd.grad(w * loss, head.weight)
        torch.testing.assert_close(head.weight.grad, expected)


def test_errors_are_mtlvision_errors() -> None:
    assert issubclass(WeightingError, MtlvisionError)
    with pytest.raises(InternalError, match="gradients"):
        get("db_mtl").balance(torch.ones(2), None)
