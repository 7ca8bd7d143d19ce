"""The ways to run one vmapped backward: T batched ``grad_outputs`` through one autograd graph at once.

Every Jacobian path's per-task gradients come from one such backward (:func:`batched_backward`). Two ways
exist, and which is faster depends on the model, T and the machine: torch's legacy vmap behind
``torch.autograd.grad(..., is_grads_batched=True)``, which runs a convolution's and a batch norm's backward
once per task, and ``torch.func.vmap`` over one ``autograd.grad``, whose rules fold the task dimension into
the batch (docs/balancers.md, "How the per-task gradients are computed").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from mtlvision.errors import ConfigError


def vmapped(call: Callable[[], Sequence[Tensor | None]]) -> Sequence[Tensor | None]:
    """Run a vmapped backward, turning a missing batching rule into a clear error."""
    try:
        return call()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        raise ConfigError(
            "the batched (vmapped) backward failed, most likely on an operation without a batching rule: "
            f"{exc}. Select the per-task loop with GradientEngine(..., jacobian='loop') "
            "(balancer.jacobian=loop), or torch's own batched backward with "
            "mtlvision.balancers.jacobian.vmap.BACKWARD_VMAP['way'] = 'autograd'."
        ) from exc


def _autograd_batched(
    roots: Sequence[Tensor], sources: Sequence[Tensor | GradientEdge], grad_outputs: Sequence[Tensor], retain: bool
) -> Sequence[Tensor | None]:
    """``torch.autograd.grad(..., is_grads_batched=True)``: torch's legacy vmap, whose rule for a
    convolution's (and a batch norm's) backward runs it once per task at batch N."""
    many: Any = sources  # autograd takes tensors and gradient edges mixed; its stubs want one kind per call
    return torch.autograd.grad(
        roots, many, grad_outputs=grad_outputs, retain_graph=retain, allow_unused=True, is_grads_batched=True
    )


def _func_batched(
    roots: Sequence[Tensor], sources: Sequence[Tensor | GradientEdge], grad_outputs: Sequence[Tensor], retain: bool
) -> Sequence[Tensor | None]:
    """``torch.func.vmap`` over one ``torch.autograd.grad``: functorch's batching rules fold the task
    dimension into the batch, so a convolution's input gradient is one ``convolution_backward`` of batch
    T·N and a batch norm's backward one call over T·C channels (the legacy rule loops over the T tasks)."""
    many: Any = sources
    reached: list[bool] = []

    def one(*rows: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(roots, many, grad_outputs=list(rows), retain_graph=retain, allow_unused=True)
        reached[:] = [g is not None for g in grads]
        return tuple(g for g in grads if g is not None)

    # autograd casts a root's gradient to the root's dtype; under torch.func it must be given in that dtype
    found = iter(torch.func.vmap(one)(*(g.to(root.dtype) for g, root in zip(grad_outputs, roots))))
    return [next(found) if hit else None for hit in reached]


#: the ways to run one backward with T batched ``grad_outputs`` (``[T, *shape]`` each) into ``sources``
BATCHED_BACKWARDS: dict[
    str, Callable[[Sequence[Tensor], Sequence[Tensor | GradientEdge], Sequence[Tensor], bool], Sequence[Tensor | None]]
] = {"func": _func_batched, "autograd": _autograd_batched}

#: which of :data:`BATCHED_BACKWARDS` every path's vmapped backward takes: ``"func"`` (the task dimension
#: folded into the batch), ``"autograd"`` (``is_grads_batched``: per task, docs/balancers.md) or ``"auto"``
#: (the default): the path's own ``vmap_way`` (:class:`~mtlvision.balancers.jacobian.base.ParameterGradients`;
#: the layer path ``"measure"``: the faster of the two, timed once per key in :data:`MEASURED_BACKWARDS`;
#: the batched path ``"autograd"``,
#: since functorch forms the T weight gradients of a convolution as one grouped convolution several times
#: slower on CPU), but ``"autograd"`` where the step ran in reduced precision: torch.func's batch-norm
#: backward refuses a bfloat16 input with float32 statistics (torch 2.14)
BACKWARD_VMAP: dict[str, str] = {"way": "auto"}

#: the faster way to the vmapped backward, measured once per key (the layer calls' shapes, T, device,
#: dtype) in this process: torch.func's folding was 1.3x faster at T = 40 and 1.1x slower at T = 3 on one CPU
MEASURED_BACKWARDS: dict[tuple[Any, ...], str] = {}

#: ``"func"`` is measured the faster only below this fraction of ``"autograd"``'s time: folding the tasks
#: into the batch holds more at once (a resnet18 MGDA step at T = 3 on CPU peaked at 1.31x an equal-weights
#: step with it, 1.14x per task), so a tie on a noisy machine goes to the lighter way
FUNC_MARGIN = 0.9


def faster_way(seconds: dict[str, float]) -> str:
    """The way :func:`batched_backward` takes given each way's measured ``seconds``: ``"func"`` only where it
    is faster than ``"autograd"`` by :data:`FUNC_MARGIN`."""
    return "func" if seconds["func"] < FUNC_MARGIN * seconds["autograd"] else "autograd"


def _measured_way(
    key: tuple[Any, ...], roots: Sequence[Tensor], sources: Sequence[Tensor | GradientEdge], grads: Sequence[Tensor]
) -> str:
    """The faster way for ``key``, timing each way twice (alternating, graph retained) the first time."""
    if key not in MEASURED_BACKWARDS:
        seconds: dict[str, float] = {}
        for _ in range(2):
            for way, run in BATCHED_BACKWARDS.items():
                start = time.perf_counter()
                vmapped(lambda run=run: run(roots, sources, grads, True))  # type: ignore[misc]
                if roots[0].is_cuda:
                    torch.cuda.synchronize(roots[0].device)
                seconds[way] = min(seconds.get(way, float("inf")), time.perf_counter() - start)
        MEASURED_BACKWARDS[key] = faster_way(seconds)
    return MEASURED_BACKWARDS[key]


_REDUCED = (torch.float16, torch.bfloat16)


def batched_backward(
    roots: Sequence[Tensor],
    sources: Sequence[Tensor | GradientEdge],
    grad_outputs: Sequence[Tensor],
    *,
    retain: bool,
    reduced: bool = False,
    preferred: str = "func",
    key: tuple[Any, ...] = (),
) -> Sequence[Tensor | None]:
    """``[T, *shape]`` per source (None where no root reaches it): one backward from ``roots`` with the
    batched ``grad_outputs``, the way :data:`BACKWARD_VMAP` names; ``reduced``: the caller saw activations
    in float16 or bfloat16 (a root in those dtypes counts too); ``preferred``: the way ``"auto"`` takes
    otherwise (``"measure"``: the faster for ``key``, see :data:`MEASURED_BACKWARDS`)."""
    way = BACKWARD_VMAP["way"]
    if way == "auto":
        way = "autograd" if reduced or any(r.dtype in _REDUCED for r in roots) else preferred
        if way == "measure":
            way = _measured_way((key, len(sources), str(roots[0].device)), roots, sources, grad_outputs)
    if way not in BATCHED_BACKWARDS:
        raise ConfigError(f"BACKWARD_VMAP['way'] must be 'auto' or one of {sorted(BATCHED_BACKWARDS)}, got {way!r}")
    return vmapped(lambda: BATCHED_BACKWARDS[way](roots, sources, grad_outputs, retain))
