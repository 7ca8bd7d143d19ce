"""The vmapped backward's two ways (``mtlvision.balancers.jacobian.vmap.BATCHED_BACKWARDS``): the same per-task
gradients, and torch.func's folds the task dimension into the convolution's batch (one call of batch T·N)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.profiler import ProfilerActivity, profile

from mtlvision.balancers.jacobian.vmap import (
    BACKWARD_VMAP,
    FUNC_MARGIN,
    MEASURED_BACKWARDS,
    batched_backward,
    faster_way,
)
from mtlvision.errors import ConfigError

T, N = 3, 4


def problem(
    groups: int = 1, stride: int = 1, padding: int = 1, dilation: int = 1
) -> tuple[torch.Tensor, list, nn.Module]:
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
    )
    x = torch.randn(N, 4, 9, 9)
    first = trunk[0](x)
    out = trunk[3](trunk[2](trunk[1](first)))
    weights = torch.randn(T, *out.shape[1:])
    losses = torch.stack([(out * weights[t]).sum() + t * out.pow(2).mean() for t in range(T)])
    return losses, [get_gradient_edge(first), *trunk.parameters()], trunk


@pytest.mark.parametrize("geometry", [{}, {"groups": 2}, {"stride": 2, "padding": 0}, {"dilation": 2, "padding": 2}])
def test_func_way_equals_autograd_way_and_per_task_grads(geometry: dict[str, int]) -> None:
    losses, sources, _ = problem(**geometry)
    eye = [torch.eye(T)]
    by_func = batched_backward([losses], sources, eye, retain=True)
    BACKWARD_VMAP["way"] = "autograd"
    try:
        by_autograd = batched_backward([losses], sources, eye, retain=True)
    finally:
        BACKWARD_VMAP["way"] = "auto"
    for t in range(T):
        many: list = sources
        per_task = torch.autograd.grad(losses[t], many, retain_graph=True)
        for a, b, c in zip(by_func, by_autograd, per_task):
            assert a is not None and b is not None
            torch.testing.assert_close(a[t], c, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b[t], c, rtol=1e-5, atol=1e-5)


def inner_convolution_backwards(way: str) -> list[list[int]]:
    """The shapes of the output gradients of the ``convolution_backward`` calls that the vmapped backward of
    the second convolution runs under the batching rule (below the one logical call autograd makes)."""
    losses, sources, trunk = problem()
    BACKWARD_VMAP["way"] = way
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            batched_backward([losses], [sources[0], trunk[3].weight], [torch.eye(T)], retain=True)
    finally:
        BACKWARD_VMAP["way"] = "auto"
    return [
        list(e.input_shapes[0])
        for e in prof.events()
        if e.name == "aten::convolution_backward" and e.cpu_parent is not None and e.cpu_parent.name == e.name
    ]


def test_func_way_folds_the_tasks_into_the_convolution_batch() -> None:
    # torch.func: the input gradient as one call of batch T·N, the weight gradient as one grouped call over
    # T·O channels; is_grads_batched: one call of batch N per task
    assert inner_convolution_backwards("func") == [[T * N, 6, 9, 9], [N, T * 6, 9, 9]]
    assert inner_convolution_backwards("autograd") == [[N, 6, 9, 9]] * T


def test_unreached_source_is_none_and_unknown_way_is_refused() -> None:
    losses, sources, _ = problem()
    stray = torch.zeros(2, requires_grad=True)
    grads = batched_backward([losses], [stray, *sources[1:]], [torch.eye(T)], retain=True)
    assert grads[0] is None and all(g is not None and g.shape[0] == T for g in grads[1:])
    BACKWARD_VMAP["way"] = "nonsense"
    try:
        with pytest.raises(ConfigError, match="BACKWARD_VMAP"):
            batched_backward([losses], sources, [torch.eye(T)], retain=True)
    finally:
        BACKWARD_VMAP["way"] = "auto"


def test_reduced_precision_takes_the_autograd_way() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rep = trunk(torch.randn(2, 3, 6, 6))
    assert rep.dtype == torch.bfloat16
    grads = batched_backward([rep], list(trunk.parameters()), [torch.randn(T, *rep.shape)], retain=True)
    assert all(g is not None and g.shape[0] == T and torch.isfinite(g).all() for g in grads)


def test_measured_way_is_timed_once_per_key_and_gives_the_same_gradients() -> None:
    losses, sources, _ = problem()
    eye = [torch.eye(T)]
    MEASURED_BACKWARDS.clear()
    measured = batched_backward([losses], sources, eye, retain=True, preferred="measure", key=("tiny",))
    assert list(MEASURED_BACKWARDS.values()) in (["func"], ["autograd"])
    reference = batched_backward([losses], sources, eye, retain=True)
    for a, b in zip(measured, reference):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # the two ways differ by float round-off
    batched_backward([losses], sources, eye, retain=True, preferred="measure", key=("tiny",))
    assert len(MEASURED_BACKWARDS) == 1  # the same key is not measured again


def test_the_heavier_folded_way_is_taken_only_when_clearly_faster() -> None:
    assert faster_way({"func": 0.5, "autograd": 1.0}) == "func"
    assert faster_way({"func": (FUNC_MARGIN + 0.05), "autograd": 1.0}) == "autograd"  # a near tie: the lighter
    assert faster_way({"func": 1.2, "autograd": 1.0}) == "autograd"
