"""FORUM against a transcription of LibMTL's ``bacth_forward_FORUM`` (median-research-group/LibMTL, trainer.py:
the same model, batches and steps give the same task weights, λ and parameters), its QP against cvxpy (the
solver LibMTL uses), its state in checkpoints, its hyper-parameters, and its run in the Trainer."""

from __future__ import annotations

import copy
import io

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.testing import assert_close

from mtlvision.balancers import get
from mtlvision.balancers.bilevel import BilevelProblem
from mtlvision.balancers.bilevel.forum import forum_weights
from mtlvision.errors import ConfigError, InternalError

T = 3


def network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, T)).double()


def batches(seed: int) -> list[tuple[Tensor, Tensor]]:
    """Two steps' (inner, outer) batches: four batches of 8 samples, one target per task."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=generator, dtype=torch.float64),
             torch.randn(8, T, generator=generator, dtype=torch.float64)) for _ in range(4)]  # fmt: skip


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


# ------------------------------------------------------------------------------- LibMTL's step, transcribed
class TW(nn.Module):
    """LibMTL's task-weight module: logits initialised at 1/T, weights softmax(logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.full((T,), 1.0 / T, dtype=torch.float64))

    def forward(self, loss: Tensor) -> Tensor:
        return (F.softmax(self.weights, dim=-1) * loss).sum()


def libmtl_forum_step(
    model, tw, optimizer, tw_optimizer, inner, outer, lambda_buffer, epoch, phi, inner_step, inner_lr
):
    """``bacth_forward_FORUM`` without the meter, in float64 (LibMTL's own arithmetic, step by step)."""
    grad_index = [p.numel() for p in model.parameters()]
    g_f = torch.autograd.grad(tw(task_losses(model, *inner)), list(tw.parameters()) + list(model.parameters()))
    g_f = torch.cat([g.view(-1) for g in g_f])
    inner_model = copy.deepcopy(model)
    inner_optim = torch.optim.SGD(inner_model.parameters(), lr=inner_lr, weight_decay=0)
    for _ in range(inner_step):
        loss = tw(task_losses(inner_model, *inner))
        if loss.item() > 1e5:
            break
        inner_optim.zero_grad()
        loss.backward()
        inner_optim.step()
        tw_optimizer.zero_grad()
    g_f_hat_alpha = torch.cat(
        [g.view(-1) for g in torch.autograd.grad(tw(task_losses(inner_model, *inner)), tw.parameters())]
    )
    g_q_beta = g_f.clone()
    g_q_beta[:T] = g_q_beta[:T] - g_f_hat_alpha
    losses = task_losses(model, *outer)
    g_F = torch.stack(
        [torch.cat([g.view(-1) for g in torch.autograd.grad(losses[tn], model.parameters(), retain_graph=True)])
         for tn in range(T)]
    )  # fmt: skip
    g_F = g_F / g_F.pow(2).sum(-1).sqrt().unsqueeze(1)
    g_F = torch.cat([torch.zeros(T, T, dtype=g_F.dtype), g_F], dim=1)
    pi = [phi - ((g_q_beta * g_F[tn]).sum() / (g_q_beta.norm().pow(2) + 1e-8)).item() for tn in range(T)]
    w_constant = phi * (g_q_beta.norm().pow(2) + 1e-8).item()
    A = torch.cat([g_F, g_q_beta.unsqueeze(0)], dim=0)
    c, v = np.linalg.eig((A @ A.t()).detach().numpy())
    gg_sqrt = v @ np.diag(np.sqrt(np.maximum(c, 0))) @ np.linalg.inv(v)
    w_cp = cp.Variable(shape=(T + 1), nonneg=True)
    constraints = [cp.sum(w_cp[:-1]) == 1, w_cp[-1] >= cp.sum([w_cp[tn] * pi[tn] for tn in range(T)]), w_cp >= 0]
    prob = cp.Problem(cp.Minimize(cp.quad_over_lin(np.real(gg_sqrt) @ w_cp, 1) - w_cp[-1] * w_constant), constraints)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    w_cpu = w_cp.value
    for tn in range(T):
        lambda_buffer[tn] = lambda_buffer[tn] + (1 / (epoch + 1) ** (3 / 4)) * (w_cpu[tn] - lambda_buffer[tn])
    nu = max(sum(lambda_buffer[tn] * pi[tn] for tn in range(T)), 0)
    g_final = sum(lambda_buffer[tn] * g_F[tn] for tn in range(T)) + nu * g_q_beta
    tw_optimizer.zero_grad()
    for param in tw.parameters():
        param.grad = g_final[:T]
    optimizer.zero_grad()
    for count, param in enumerate(model.parameters()):
        beg, end = sum(grad_index[:count]), sum(grad_index[: count + 1])
        param.grad = g_final[T:][beg:end].contiguous().view(param.data.size()).data.clone()
    tw_optimizer.step()
    optimizer.step()
    return lambda_buffer


def our_forum_step(model, balancer, optimizer, inner, outer, epoch) -> None:
    """Our meta-step, then the trainer's update: ∇ of the balanced training losses plus FORUM's own part."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def at(x: Tensor, y: Tensor):
        return lambda p: task_losses(lambda z: torch.func.functional_call(model, dict(zip(names, p)), (z,)), x, y)

    balancer.meta_step(BilevelProblem(params, at(*inner), at(*outer), lr=0.0, epoch=epoch))
    optimizer.zero_grad()
    losses = task_losses(model, *inner)
    (balancer.balance(losses, None).weights * losses).sum().backward()
    extra = balancer.take_gradient().split([p.numel() for p in params])
    for p, g in zip(params, extra):
        p.grad += g.view_as(p)
    optimizer.step()


# φ = 0.1 gives ν = 0 on seed 0 (the weights stay, the model follows the validation losses alone); φ = 0.5, 1
@pytest.mark.parametrize(("seed", "inner_steps", "phi"), [(0, 1, 0.1), (1, 3, 0.5), (0, 5, 1.0)])
def test_two_steps_equal_libmtls_forum(seed: int, inner_steps: int, phi: float) -> None:
    data = batches(seed)
    theirs, ours = network(seed), network(seed)
    tw = TW()
    their_opt, their_tw_opt = torch.optim.SGD(theirs.parameters(), lr=0.05), torch.optim.Adam(tw.parameters(), lr=0.01)
    lambda_buffer = np.zeros(T)
    balancer = get("forum", inner_lr=0.1, inner_steps=inner_steps, phi=phi, outer_lr=0.01)
    balancer.setup(T)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.05)
    for epoch, (inner, outer) in enumerate([(data[0], data[1]), (data[2], data[3])]):  # epochs 0 and 1
        lambda_buffer = libmtl_forum_step(
            theirs, tw, their_opt, their_tw_opt, inner, outer, lambda_buffer, epoch, phi, inner_steps, 0.1
        )
        our_forum_step(ours, balancer, our_opt, inner, outer, epoch)
        assert_close(balancer.lambdas, torch.from_numpy(lambda_buffer), rtol=1e-6, atol=1e-7)
        assert_close(balancer.task_weights(), torch.softmax(tw.weights.detach(), 0), rtol=1e-7, atol=1e-9)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert_close(p, q, rtol=1e-6, atol=1e-8)
    moved = float((balancer.task_weights() - 1 / T).abs().max())
    assert moved > 1e-4 if phi > 0.1 else moved == 0.0


@pytest.mark.parametrize(("seed", "size"), [(0, 1.0), (1, 1.0), (2, 10.0), (3, 1e3), (4, 1e5), (5, 1e6)])
def test_the_qp_equals_cvxpys_solution_and_satisfies_its_constraints(seed: int, size: float) -> None:
    """Random normalised gradients and a g_q of sizes up to 1e6: the constraints hold and the weights equal
    cvxpy's on the same problem, solved in w_T·‖g_q‖ for its scale."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((T + 1, 7))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    a[T] *= size
    gramian, phi = a @ a.T, 0.1
    squared = gramian[T, T] + 1e-8
    pi = phi - gramian[:T, T] / squared
    w = forum_weights(gramian, phi)
    assert (w >= 0).all() and abs(w[:T].sum() - 1) < 1e-9 and w[T] >= pi @ w[:T] - 1e-9
    x = cp.Variable(T + 1, nonneg=True)  # (w_{<T}, ‖g_q‖ w_T)
    scaled = np.vstack([a[:T], a[T] / size])
    constraints = [cp.sum(x[:T]) == 1, x[T] >= size * pi @ x[:T]]
    objective = cp.sum_squares(scaled.T @ x) - phi * squared / size * x[T]
    cp.Problem(cp.Minimize(objective), constraints).solve(solver=cp.CLARABEL)
    assert_close(torch.from_numpy(w[:T]), torch.from_numpy(x.value[:T]), rtol=1e-5, atol=1e-6)
    assert_close(float(w[T]), float(x.value[T]) / size, rtol=1e-5, atol=1e-6)


def test_state_round_trips_through_a_weights_only_checkpoint() -> None:
    data = batches(5)
    original, model = get("forum", outer_lr=0.01, inner_steps=2), network(5)
    original.setup(T)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def problem(i: int) -> BilevelProblem:
        def at(x: Tensor, y: Tensor):
            return lambda p: task_losses(lambda z: torch.func.functional_call(model, dict(zip(names, p)), (z,)), x, y)

        return BilevelProblem(params, at(*data[i]), at(*data[i + 1]), lr=0.0, epoch=i)

    for i in range(2):
        original.meta_step(problem(i))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = get("forum", outer_lr=0.01, inner_steps=2)
    restored.setup(T)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_close(restored.lambdas, original.lambdas)
    original.meta_step(problem(2))
    restored.meta_step(problem(2))
    assert_close(restored.logits, original.logits)
    assert_close(restored.take_gradient(), original.take_gradient())


def test_hyper_parameters_are_validated() -> None:
    for hparams in [{"inner_lr": 0.0}, {"inner_steps": 0}, {"inner_steps": 1.5}, {"phi": -0.1}, {"outer_lr": 0}]:
        with pytest.raises(ConfigError):
            get("forum", **hparams)
    with pytest.raises(InternalError, match="before its meta-step"):
        get("forum").balance(torch.ones(T), None)


def test_trainer_adds_forums_own_part_of_the_update() -> None:
    from mtlvision.engine.trainer import Trainer
    from tests.engine.tinyrun import TinyScenes, tiny_model

    torch.manual_seed(0)
    balancer = get("forum", outer_lr=0.05, inner_steps=2, inner_lr=0.01)
    trainer = Trainer(tiny_model(), balancer, epochs=1, batch_size=4, lr=0.05, device="cpu", progress=False)
    trainer.fit(TinyScenes(8), TinyScenes(8))
    assert trainer.state.step == 2
    balancer = trainer.balancer
    assert float(balancer.lambdas.sum()) == pytest.approx(1.0, abs=1e-9)  # epoch 0: λ is the QP's simplex part
    assert balancer.take_gradient() is None  # handed out to the step
