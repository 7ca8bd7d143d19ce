"""The any-loop API (``mv.MultiTaskBackward``, ``mv.mtl_backward``): its ``.grad`` against plain autograd,
``aggregate`` on the explicit Jacobian and the Trainer's own step; AMP, accumulation and its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

import mtlvision as mv
from mtlvision.balancers import aggregate
from mtlvision.errors import ConfigError


class Net(nn.Module):
    """A conv trunk (what the layer path taps) and three linear heads."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.Flatten()
        )
        self.heads = nn.ModuleList([nn.Linear(8 * 3 * 3, 4), nn.Linear(8 * 3 * 3, 1), nn.Linear(8 * 3 * 3, 2)])


def batch(seed: int = 1, n: int = 6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x, [
        torch.randint(0, 4, (n,), generator=g),
        torch.randn(n, 1, generator=g),
        torch.randint(0, 2, (n,), generator=g),
    ]


def task_losses(net: Net, feats: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    a, b, c = (head(feats) for head in net.heads)
    return [F.cross_entropy(a, ys[0]), F.mse_loss(b, ys[1]), F.cross_entropy(c, ys[2])]


def grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_ew_gives_plain_autograds_grad_with_the_heads_found_from_the_losses():
    net, ref = Net(), Net()
    x, ys = batch()
    mtl = mv.MultiTaskBackward(net.trunk, "ew")
    with mtl.record():
        losses = task_losses(net, net.trunk(x), ys)
    weights = mtl.backward(losses)
    sum(task_losses(ref, ref.trunk(x), ys)).backward()
    assert torch.equal(weights, torch.ones(3))
    for ours, theirs in zip(grads(net), grads(ref)):
        assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def explicit_jacobian(net: Net, x: torch.Tensor, ys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """G [T, P] over the trunk's parameters by one autograd.grad per task, and the losses."""
    losses = task_losses(net, net.trunk(x), ys)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.trunk.parameters()), retain_graph=True)])
        for loss in losses
    ]
    return torch.stack(rows), torch.stack(losses).detach()


@pytest.mark.parametrize("jacobian", ["auto", "rule", "batched", "loop"])
@pytest.mark.parametrize("method", ["upgrad", "mgda", "pcgrad", "imtl_g", "cagrad"])
def test_a_gradient_methods_shared_grad_is_aggregate_on_the_explicit_jacobian(method, jacobian):
    net = Net()
    x, ys = batch()
    G, values = explicit_jacobian(Net(), x, ys)
    mtl = mv.MultiTaskBackward(net.trunk, method, jacobian=jacobian)
    assert mtl.jacobian == {"rule": "layers"}.get(jacobian, jacobian)
    with mtl.record():
        losses = task_losses(net, net.trunk(x), ys)
    weights = mtl.backward(losses)
    if jacobian == "auto":  # measured at the first step: one of the three paths, each timed
        assert mtl.jacobian_choice is not None and mtl.jacobian == mtl.jacobian_choice.path
        assert sorted(mtl.jacobian_choice.seconds) == ["batched", "layers", "loop"]
    shared = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
    assert_close(shared, aggregate(method, G, losses=values), rtol=1e-4, atol=1e-6)
    # each head sees its own task only: its gradient is that task's weighted gradient
    ref = Net()
    ref_losses = task_losses(ref, ref.trunk(x), ys)
    for t, head in enumerate(net.heads):
        expected = torch.autograd.grad(ref_losses[t], list(ref.heads[t].parameters()), retain_graph=True)
        for p, g in zip(head.parameters(), expected):
            assert_close(p.grad, weights[t] * g, rtol=1e-5, atol=1e-7)


def test_features_give_the_same_grad_and_representation_mode_aggregates_the_representation_jacobian():
    x, ys = batch()
    plain, with_features = Net(), Net()
    for net, give in ((plain, False), (with_features, True)):
        mtl = mv.MultiTaskBackward(net.trunk, "upgrad", jacobian="batched")
        feats = net.trunk(x)
        mtl.backward(task_losses(net, feats, ys), features=feats if give else None)
    for a, b in zip(grads(plain), grads(with_features)):
        assert_close(a, b, rtol=1e-5, atol=1e-7)

    net, ref = Net(), Net()
    mtl = mv.MultiTaskBackward(net.trunk, "mgda_ub")
    assert mtl.mode == "representation"
    feats = net.trunk(x)
    mtl.backward(task_losses(net, feats, ys), features=feats)
    ref_feats = ref.trunk(x)
    ref_losses = task_losses(ref, ref_feats, ys)
    R = torch.stack([torch.autograd.grad(loss, ref_feats, retain_graph=True)[0].reshape(-1) for loss in ref_losses])
    direction = aggregate("mgda", R, losses=torch.stack(ref_losses).detach()).view_as(ref_feats)
    expected = torch.autograd.grad(ref_feats, list(ref.trunk.parameters()), grad_outputs=direction)
    for p, g in zip(net.trunk.parameters(), expected):
        assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["ew", "mgda"])
def test_the_grad_equals_the_trainers_own_step(method):
    from ..engine.tinyrun import TinyScenes, tiny_model

    model, copy_ = tiny_model(), tiny_model()
    trainer = mv.Trainer(model, method, epochs=1, batch_size=8, lr=1e-3, progress=False)
    data = trainer.collate([TinyScenes(8)[i] for i in range(8)])
    trainer.train_step([data])
    mtl = mv.MultiTaskBackward(copy_.architecture, method)
    with mtl.record():
        predictions = copy_(data["image"])
    mtl.backward(trainer.task_losses(predictions, data))
    for (name, p), q in zip(model.named_parameters(), copy_.parameters()):
        assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_grad_scaler_scales_the_gradients_not_the_loss_values_the_method_sees():
    net, ref = Net(), Net()
    x, ys = batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mtl = mv.MultiTaskBackward(net.trunk, "dwa")
    mtl.backward(task_losses(net, net.trunk(x), ys), scaler=scaler)
    scaler.scale(sum(task_losses(ref, ref.trunk(x), ys))).backward()
    for a, b in zip(grads(net), grads(ref)):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    scaler.step(opt)
    scaler.update()
    moved = [p.detach() - b for p, b in zip(net.parameters(), before)]
    for m, g in zip(moved, grads(ref)):
        assert_close(m, -0.1 * g / 1024.0, rtol=1e-4, atol=1e-7)

    with pytest.raises(ConfigError, match="needs unscaled gradients: use bf16 autocast"):
        mv.MultiTaskBackward(net.trunk, "upgrad").backward(task_losses(net, net.trunk(x), ys), scaler=scaler)


def test_bf16_autocast_runs_a_gradient_method_close_to_float32():
    net, ref = Net(), Net()
    x, ys = batch()
    mtl = mv.MultiTaskBackward(net.trunk, "upgrad")
    with mtl.record(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task_losses(net, net.trunk(x), ys)
    mtl.backward([loss.float() for loss in losses])
    mv.MultiTaskBackward(ref.trunk, "upgrad", jacobian="batched").backward(task_losses(ref, ref.trunk(x), ys))
    for a, b in zip(grads(net.trunk), grads(ref.trunk)):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_accumulation_over_two_halves_equals_the_whole_batch_for_a_loss_weighting():
    net, ref = Net(), Net()
    x, ys = batch(n=8)
    mtl = mv.MultiTaskBackward(net.trunk, "ew")
    for half in (slice(0, 4), slice(4, 8)):
        mtl.backward(task_losses(net, net.trunk(x[half]), [y[half] for y in ys]), scale=0.5)
    sum(task_losses(ref, ref.trunk(x), ys)).backward()
    for a, b in zip(grads(net), grads(ref)):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_gradient_method_refuses_grads_already_there_unless_asked_to_accumulate():
    net = Net()
    x, ys = batch()
    mtl = mv.MultiTaskBackward(net.trunk, "upgrad", jacobian="batched")
    mtl.backward(task_losses(net, net.trunk(x), ys))
    first = grads(net.trunk)
    with pytest.raises(ConfigError, match=r"call optimizer.zero_grad\(\)"):
        mtl.backward(task_losses(net, net.trunk(x), ys))
    mtl.backward(task_losses(net, net.trunk(x), ys), accumulate=True)
    for a, b in zip(grads(net.trunk), first):
        assert_close(a, 2 * b, rtol=1e-5, atol=1e-7)


def test_the_layer_path_refuses_a_forward_run_outside_record():
    net = Net()
    x, ys = batch()
    mtl = mv.MultiTaskBackward(net.trunk, "upgrad")
    assert mtl.needs_record
    with pytest.raises(ConfigError, match=r"inside `with mtl.record\(\):`"):
        mtl.backward(task_losses(net, net.trunk(x), ys))
    assert not mv.MultiTaskBackward(list(net.trunk.parameters()), "upgrad").needs_record


def test_famo_refuses_a_second_backward_without_the_post_step_losses_and_trains_with_them():
    net = Net()
    x, ys = batch()
    mtl = mv.MultiTaskBackward(net.trunk, "famo")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    assert mtl.needs_post_step_losses
    weights = []
    for _ in range(2):
        opt.zero_grad()
        weights.append(mtl.backward(task_losses(net, net.trunk(x), ys)))
        opt.step()
        with torch.no_grad():
            mtl.after_step(task_losses(net, net.trunk(x), ys))
    assert not torch.allclose(weights[0], weights[1])  # FAMO's logits moved with L(θ_{t+1})
    opt.zero_grad()
    mtl.backward(task_losses(net, net.trunk(x), ys))
    with pytest.raises(ConfigError, match=r"call mtl.after_step\(new_losses\)"):
        mtl.backward(task_losses(net, net.trunk(x), ys))


def test_learnable_weights_need_num_tasks_up_front_and_then_train():
    net = Net()
    x, ys = batch()
    with pytest.raises(ConfigError, match=r"num_tasks=3\) and give mtl.parameters\(\)"):
        mv.MultiTaskBackward(net.trunk, "uw").backward(task_losses(net, net.trunk(x), ys))
    mtl = mv.MultiTaskBackward(net.trunk, "uw", num_tasks=3)
    (log_var,) = mtl.parameters()
    mtl.backward(task_losses(net, net.trunk(x), ys))
    assert log_var.grad is not None and log_var.grad.abs().sum() > 0


def test_representation_mode_without_features_and_epoch_methods_are_explained():
    net = Net()
    x, ys = batch()
    with pytest.raises(ConfigError, match=r"pass backward\(losses, features=...\)"):
        mv.MultiTaskBackward(net.trunk, "mgda_ub").backward(task_losses(net, net.trunk(x), ys))
    with pytest.raises(ConfigError, match="not defined on representation gradients"):
        mv.MultiTaskBackward(net.trunk, "pcgrad", mode="representation")
    mtl = mv.MultiTaskBackward(net.trunk, "dwa")
    assert mtl.needs_epoch_end and not mv.MultiTaskBackward(net.trunk, "ew").needs_epoch_end
    with pytest.raises(ConfigError, match="no backward was run"):
        mtl.end_epoch()
    seen = []
    for epoch in range(3):
        seen.append(mtl.backward(task_losses(net, net.trunk(x * (epoch + 1)), ys)))
        mtl.end_epoch()
    seen.append(mtl.backward(task_losses(net, net.trunk(x), ys)))
    assert torch.equal(seen[0], torch.ones(3)) and not torch.allclose(seen[-1], torch.ones(3))


def test_the_one_call_function_takes_stateless_methods_by_name_only():
    net = Net()
    x, ys = batch()
    G, values = explicit_jacobian(Net(), x, ys)
    mv.mtl_backward(task_losses(net, net.trunk(x), ys), net.trunk, "upgrad")
    shared = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
    assert_close(shared, aggregate("upgrad", G, losses=values), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="keeps state across steps"):
        mv.mtl_backward(task_losses(net, net.trunk(x), ys), net.trunk, "gradvac")
    with pytest.raises(ConfigError, match="use mv.MultiTaskBackward and its after_step"):
        mv.mtl_backward(task_losses(net, net.trunk(x), ys), net.trunk, "famo")
    gradvac = mv.balancers.get("gradvac")
    net.zero_grad(set_to_none=True)
    mv.mtl_backward(task_losses(net, net.trunk(x), ys), net.trunk, gradvac)
    assert gradvac.targets is not None  # its state lives in the caller's instance


def test_bad_input_is_named():
    net = Net()
    with pytest.raises(ConfigError, match="no parameters that require grad"):
        mv.MultiTaskBackward(nn.ReLU())
    with pytest.raises(ConfigError, match="list of scalar tensors"):
        mv.MultiTaskBackward(net.trunk).backward([torch.ones(2, requires_grad=True)])
    with pytest.raises(ConfigError, match="hyper-parameters"):
        mv.MultiTaskBackward(net.trunk, mv.balancers.get("ew"), alpha=1.0)


def _distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, ys = batch(n=8)
        part = slice(4 * rank, 4 * rank + 4)
        found = {}
        for method in DISTRIBUTED:
            net = Net()
            mtl = mv.MultiTaskBackward(net.trunk, method, distributed=True)
            with mtl.record():
                losses = task_losses(net, net.trunk(x[part]), [y[part] for y in ys])
            mtl.backward(losses)
            found[method] = grads(net)
        if rank == 0:
            torch.save(found, out)
    finally:
        dist.destroy_process_group()


DISTRIBUTED = ("ew", "upgrad")  # a loss weighting averages every .grad; a gradient method reduces the Jacobian


def test_two_processes_give_the_grad_of_one_process_on_the_combined_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "grads.pt"
    mp.spawn(_distributed_worker, args=(2, port, str(out)), nprocs=2, join=True)
    found = torch.load(out, weights_only=True)
    x, ys = batch(n=8)
    for method in DISTRIBUTED:
        net = Net()
        mtl = mv.MultiTaskBackward(net.trunk, method)
        with mtl.record():
            losses = task_losses(net, net.trunk(x), ys)
        mtl.backward(losses)
        for ours, single in zip(found[method], grads(net)):
            assert_close(ours, single, rtol=1e-4, atol=1e-6, msg=method)


def test_distributed_needs_a_process_group():
    with pytest.raises(ConfigError, match="initialised torch.distributed group"):
        mv.MultiTaskBackward(Net().trunk, "upgrad", distributed=True)
