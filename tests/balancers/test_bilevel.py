"""Auto-Lambda and MOML: their meta-gradients against the exact hypergradient computed by differentiating
through the virtual step (autograd with create_graph), their Adam step, and their run in the Trainer (a
validation batch per step, the model untouched by the meta-step, clear errors without a validation split)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from mtlvision.balancers import MultiTaskBackward, get
from mtlvision.balancers.bilevel import BilevelProblem
from mtlvision.errors import ConfigError

T = 3


def problem(seed: int, lr: float = 0.1, tasks: int = T) -> BilevelProblem:
    """A two-layer network with one output per task, float64; training and validation data differ."""
    generator = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(4, 5, generator=generator, dtype=torch.float64).requires_grad_(True),
        torch.randn(5, tasks, generator=generator, dtype=torch.float64).requires_grad_(True),
    ]
    x_train, x_val = (torch.randn(8, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    y_train, y_val = (torch.randn(8, tasks, generator=generator, dtype=torch.float64) for _ in range(2))

    def losses(x: Tensor, y: Tensor):
        return lambda p: ((torch.tanh(x @ p[0]) @ p[1] - y) ** 2).mean(dim=0)

    return BilevelProblem(params, losses(x_train, y_train), losses(x_val, y_val), lr)


def exact_hypergradients(prob: BilevelProblem, logits: Tensor, lr: float) -> Tensor:
    """[T, T]: row t is ∂V_t(θ'(ξ))/∂ξ with θ'(ξ) = θ − lr ∇_θ Σ softmax(ξ)_s L_s(θ), by autograd through it."""
    xi = logits.clone().requires_grad_(True)
    train = prob.train_losses(prob.parameters)
    step = torch.autograd.grad((torch.softmax(xi, 0) * train).sum(), prob.parameters, create_graph=True)
    val = prob.val_losses([p - lr * g for p, g in zip(prob.parameters, step)])
    return torch.stack([torch.autograd.grad(val[t], xi, retain_graph=True)[0] for t in range(val.numel())])


@pytest.mark.parametrize("seed", range(4))
def test_auto_lambda_meta_gradient_is_the_finite_difference_of_the_exact_hypergradient(seed: int) -> None:
    prob = problem(seed, lr=0.05)
    balancer = get("auto_lambda")
    balancer.setup(T)
    balancer.logits = torch.randn(T, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    exact = exact_hypergradients(prob, balancer.logits, 0.05).sum(dim=0)
    assert_close(balancer.meta_gradient(prob), exact, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_moml_meta_gradient_is_mgda_of_the_normalised_exact_hypergradients(seed: int) -> None:
    prob = problem(seed, tasks=2)
    balancer = get("moml", inner_lr=0.1)
    balancer.setup(2)
    rows = exact_hypergradients(prob, balancer.logits, 0.1)
    h1, h2 = rows / rows.norm(dim=1, keepdim=True)
    # MGDA for two vectors in closed form (Sener & Koltun 2018, Algorithm 1): γ h1 + (1 − γ) h2
    gap = float((h1 - h2) @ (h1 - h2))
    gamma = 1.0 if gap < 1e-20 else min(max(float(((h2 - h1) @ h2) / gap), 0.0), 1.0)
    assert_close(balancer.meta_gradient(prob), gamma * h1 + (1 - gamma) * h2, rtol=1e-6, atol=1e-9)


def test_meta_step_is_one_adam_step_and_leaves_the_parameters_alone() -> None:
    prob = problem(0)
    before = [p.detach().clone() for p in prob.parameters]
    balancer = get("auto_lambda", outer_lr=0.01)
    balancer.setup(T)
    grad = balancer.meta_gradient(prob)
    balancer.meta_step(prob)
    # Adam's first step moves each coordinate by lr·sign(g) (up to its ε)
    assert_close(balancer.logits, -0.01 * torch.sign(grad), rtol=1e-5, atol=1e-9)
    for p, q in zip(prob.parameters, before):
        assert torch.equal(p.detach(), q)
    update = balancer.balance(torch.ones(T), None)
    assert_close(update.weights.double(), torch.softmax(balancer.logits, 0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["auto_lambda", "moml"])
def test_state_round_trips_through_a_weights_only_checkpoint(name: str) -> None:
    original = get(name)
    original.setup(T)
    for seed in range(2):
        original.meta_step(problem(seed))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = get(name)
    restored.setup(T)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for seed in range(2, 4):
        original.meta_step(problem(seed))
        restored.meta_step(problem(seed))
    assert_close(restored.logits, original.logits)


def test_hyper_parameters_and_misuse_are_refused() -> None:
    for name, hparams in [
        ("auto_lambda", {"outer_lr": 0.0}),
        ("auto_lambda", {"fd_scale": -1.0}),
        ("moml", {"inner_lr": 0}),
    ]:
        with pytest.raises(ConfigError):
            get(name, **hparams)
    with pytest.raises(ConfigError, match="is bilevel"):
        MultiTaskBackward(torch.nn.Linear(2, 2), "auto_lambda")


# ------------------------------------------------------------------------------------------ in the Trainer
def trainer_for(name: str, **hparams):
    from mtlvision.engine.trainer import Trainer
    from tests.engine.tinyrun import tiny_model

    torch.manual_seed(0)
    return Trainer(tiny_model(), get(name, **hparams), epochs=1, batch_size=4, lr=0.05, device="cpu", progress=False)


def test_trainer_learns_the_weights_on_validation_batches_and_leaves_the_model_alone() -> None:
    from tests.engine.tinyrun import TinyScenes

    trainer = trainer_for("auto_lambda", outer_lr=0.05)
    trainer.fit(TinyScenes(8), TinyScenes(8))  # two steps, each after a meta-step
    assert trainer.state.step == 2
    weights = trainer.balancer.task_weights()
    assert abs(float(weights.sum()) - 1.0) < 1e-12 and float((weights - 1 / 3).abs().max()) > 1e-3
    # a meta-step changes neither the parameters nor the buffers
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = next(iter(trainer.loader(TinyScenes(4), shuffle=False)))
    trainer._meta(batch)
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_bilevel_method_without_a_validation_split_is_refused() -> None:
    from tests.engine.tinyrun import TinyScenes

    with pytest.raises(ConfigError, match="no validation split"):
        trainer_for("moml").fit(TinyScenes(8))


def test_validation_batches_depend_only_on_the_step() -> None:
    from mtlvision.engine.bilevel import MetaStep
    from tests.engine.tinyrun import TinyScenes

    trainer, val = trainer_for("moml"), TinyScenes(12)  # three validation batches of 4
    meta = MetaStep(trainer, val)
    seen = []
    for step in range(7):
        trainer.state.step = step
        seen.append(meta.validation_batch()["image"])
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    # each pass covers the split once, in a new order
    assert_close(sum(b.double().sum() for b in seen[:3]), sum(b.double().sum() for b in seen[3:6]))
    assert not torch.equal(seen[0], seen[3])
    resumed = MetaStep(trainer, val)  # as after a resume at step 4
    trainer.state.step = 4
    assert torch.equal(resumed.validation_batch()["image"], seen[4])


def test_a_split_that_is_not_a_multiple_of_the_batch_size_is_drawn_pass_after_pass() -> None:
    from mtlvision.engine.bilevel import MetaStep
    from tests.engine.tinyrun import TinyScenes

    trainer, val = trainer_for("moml"), TinyScenes(10)  # batches of 4: two full ones per pass, the last 2 dropped
    meta = MetaStep(trainer, val)
    assert meta.batches == 2
    for step in range(6):  # three passes; the third batch of a pass used to end the iterator (StopIteration)
        trainer.state.step = step
        assert meta.validation_batch()["image"].shape[0] == 4
