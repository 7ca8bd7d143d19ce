"""The gradient engine: per-task gradients on request, and a balancer's :class:`Update` turned into ``.grad``.

It knows no model: only the shared parameters, the task-specific parameters and, in representation mode,
the shared representation tensors of the current step.

How the per-task gradients are computed (``jacobian="batched"``, the default):

1. **Heads, one task at a time.** Each task's loss is differentiated w.r.t. the shared representation (when
   the engine has one) and the task-specific parameters. When ``losses`` is a ``torch.stack`` of the task
   losses (what the trainer builds), every task starts from its own loss node, so task ``t`` walks only its
   own head: the T calls together cost one backward through the heads. The per-task head gradients are
   kept, so the task-specific ``.grad`` is later ``Σ_t w_t ∂L_t/∂θ_t`` without another backward.
2. **Trunk, all tasks at once.** One vmapped backward (``is_grads_batched``) from the representation into
   the shared parameters, with the T stacked representation gradients as batched ``grad_outputs``. Without
   a representation, one vmapped backward from the T losses into the shared and task-specific parameters.
3. **Applying the update needs no further backward through the trunk** when the Jacobian ``G`` is known:
   the shared ``.grad`` is ``wᵀG`` (or the balancer's ``direction``), reshaped into the parameters. In
   representation mode, ``Σ_t w_t ∂L_t/∂rep`` (or ``direction``) is back-propagated from the representation
   into the shared parameters in one ordinary backward.

Measured on this machine's CPU (resnet18 trunk, batch 16 of 64×64, T=3 linear heads, median of 5; the
machine was shared, so ±20 %): equal weights 0.21 s/step; batched trunk backward from the representation
0.60 s; a loop of T ``autograd.grad`` calls 0.60 s; vmapped backward straight from the losses 0.72 s. On CPU
torch's batching rule for ``convolution_backward`` runs the T tasks one after another, so the batched and the
loop path cost the same here (the floor: one forward plus T backward passes). On an H200 (benchmarks/
balancers.py, T=3 classification/segmentation/depth, median of 8 steps, before blocks were released early):
equal weights 11.4 ms, MGDA 28.1 ms (2.46×), MGDA in representation mode 15.1 ms (1.32×), LibMTL 1.1.5's
MGDA 110 ms; T=40: equal weights 22.6 ms, MGDA 194 ms (8.6×), LibMTL's 1.96 s.

The Gramian is accumulated block by block, ``K = Σ_l G_l G_lᵀ`` over the per-parameter blocks the
batched backward returns, and a Gramian-only balancer's update is ``Σ_t w_t G_l[t]`` per block: the flat
``[T, P]`` copy is made only when a balancer asks for ``jacobian()`` (this saved ~T·P·4 bytes of peak
memory, 134 MiB for resnet18 at T=3).

``jacobian="layers"`` (what training takes for a gradient method in parameter mode, see
:func:`resolve_jacobian_path`) goes further: the vmapped backward stops at the outputs of the shared
``Conv2d`` and ``Linear`` layers that :class:`~mtlvision.balancers.layers.LayerTaps` recorded in the forward,
so autograd forms no per-task weight gradient. Each layer's Gramian term then comes from its input and the
per-task output gradients (``⟨B_s, (A Aᵀ) B_t⟩`` where that is cheaper, else from its per-task weight
gradients, formed and dropped), the Jacobian's blocks are formed one layer at a time when a balancer reads
them, and the update is one weight gradient of ``Σ_t w_t B_t`` per layer. Other shared parameters (norms)
go through the vmapped backward as before.

Methods that keep per-task state of the Jacobian's shape (DB-MTL's moving average, MoCo's tracked gradients,
ExcessMTL's AdaGrad sums) and coordinate-wise methods (GradDrop) read the Jacobian through
:meth:`TaskGradients.jacobian_blocks`, one ``[T, n]`` block per parameter, and update their state in place;
those that return a direction release each block once used. Their peak memory is then the state itself plus
what every gradient method holds, instead of several ``[T, P]`` temporaries.

``jacobian="loop"`` selects T plain ``autograd.grad`` calls instead of the vmapped backward, for an op
without a batching rule; the batched path never silently falls back to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from mtlvision.balancers.base import Balancer, Needs, TaskGradients, Update
from mtlvision.balancers.layers import LayerCall, LayerRule, LayerTaps, group_by_module, rule_for
from mtlvision.errors import ConfigError

JacobianPath = Literal["batched", "loop", "layers"]


def _task_outputs(losses: Tensor) -> list[Tensor | GradientEdge | None]:
    """One differentiable output per task: the loss node that fed ``torch.stack`` where there is one (so
    task t back-propagates through its own head only), else ``losses[t]``; None for a constant loss."""
    node = losses.grad_fn
    if node is not None and type(node).__name__ == "StackBackward0" and len(node.next_functions) == len(losses):
        return [GradientEdge(fn, nr) if fn is not None else None for fn, nr in node.next_functions]
    if not losses.requires_grad:
        return [None] * len(losses)
    return [losses[t] for t in range(len(losses))]


def _zeros_batched(num_tasks: int, like: Tensor) -> Tensor:
    return torch.zeros((num_tasks, *like.shape), dtype=like.dtype, device=like.device)


class _StepGradients(TaskGradients):
    """Per-task gradients of one step, each computed at most once, on the device of the model."""

    def __init__(
        self,
        losses: Tensor,
        shared: Sequence[Tensor],
        task_specific: Sequence[Tensor],
        representation: Sequence[Tensor] | None,
        trunk: Sequence[Tensor] | None,
        representation_mode: bool,
        path: JacobianPath,
        reduce: Callable[[Tensor], Tensor] | None,
        gramian_dtype: torch.dtype,
        calls: Sequence[LayerCall] | None = None,
    ) -> None:
        self._losses = losses
        self._outputs = _task_outputs(losses)
        self._shared = list(shared)
        self._task_specific = list(task_specific)
        self._representation = list(representation) if representation is not None else None
        self._trunk = list(trunk) if trunk is not None else self._representation
        self._representation_mode = representation_mode
        self._path = path
        self._reduce: Callable[[Tensor], Tensor] = reduce if reduce is not None else (lambda t: t)
        self._reduce_is_identity = reduce is None
        self._gramian_dtype = gramian_dtype
        # path "layers": the tapped layer calls, and what the one vmapped backward returned for them
        self._calls = list(calls) if calls is not None else None
        self._layer_groups = group_by_module(self._calls) if self._calls is not None else {}
        tapped = {id(p) for m in self._layer_groups for p in self._rule(m).parameters(m)}
        self._untapped = [p for p in self._shared if id(p) not in tapped]
        self._output_grads: list[Tensor] | None = None  # per call: [T, *output shape]
        self._untapped_grads: list[Tensor] | None = None  # per untapped shared parameter: [T, *shape]
        self._rep_grads: list[Tensor] | None = None  # per representation tensor: [T, *shape]
        self._head_grads: list[Tensor] | None = None  # per task-specific parameter: [T, *shape]
        self._jacobian: Tensor | None = None
        self._blocks: list[Tensor] | None = None  # per shared parameter: [T, *shape], float32, reduced
        self._gramian: Tensor | None = None
        self._released = False  # set by jacobian_blocks(release=True): the Jacobian is gone

    @property
    def num_tasks(self) -> int:
        return int(self._losses.numel())

    @property
    def representation_mode(self) -> bool:
        return self._representation_mode

    @property
    def num_columns(self) -> int:
        columns = self._representation if self._representation_mode else self._shared
        assert columns is not None
        return sum(x.numel() for x in columns)

    @property
    def jacobian_known(self) -> bool:
        return self._jacobian is not None or self._blocks is not None or self._output_grads is not None

    # ------------------------------------------------------------------------------------- computation
    def _per_task_loop(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """``[T, *shape]`` per input, by one ``autograd.grad`` call per task from its own loss node."""
        rows: list[list[Tensor]] = []
        for out in self._outputs:
            if out is None:
                rows.append([torch.zeros_like(x) for x in inputs])
                continue
            grad_out = torch.ones((), dtype=self._losses.dtype, device=self._losses.device)
            grads = torch.autograd.grad(
                [out], list(inputs), grad_outputs=[grad_out], retain_graph=True, allow_unused=True,
                materialize_grads=True,
            )
            rows.append(list(grads))
        return [torch.stack([row[i] for row in rows]) for i in range(len(inputs))]

    def _batched_from_losses(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """``[T, *shape]`` per input by one vmapped backward from the T losses."""
        if not self._losses.requires_grad:
            return [_zeros_batched(self.num_tasks, x) for x in inputs]
        eye = torch.eye(self.num_tasks, dtype=self._losses.dtype, device=self._losses.device)
        return self._batched_or_zeros(inputs, self._vmapped(lambda: torch.autograd.grad(
            self._losses, list(inputs), grad_outputs=eye, retain_graph=True, allow_unused=True,
            is_grads_batched=True,
        )))

    def _batched_or_zeros(self, inputs: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
        """``[T, *shape]`` per input; zeros where no loss reaches it (``materialize_grads`` would give an
        unbatched zero under ``is_grads_batched``)."""
        return [g if g is not None else _zeros_batched(self.num_tasks, x) for g, x in zip(grads, inputs)]

    @staticmethod
    def _vmapped(call: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        try:
            return call()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            raise ConfigError(
                "the batched (vmapped) backward failed, most likely on an operation without a batching rule: "
                f"{exc}. Select the per-task loop with GradientEngine(..., jacobian='loop') "
                "(balancer.jacobian=loop)."
            ) from exc

    def _heads(self) -> None:
        """Per-task gradients of the representation and of the task-specific parameters (each task walks
        its own head only)."""
        if self._head_grads is not None:
            return
        rep = self._representation or []
        grads = self._per_task_loop([*rep, *self._task_specific])
        self._rep_grads = grads[: len(rep)]
        self._head_grads = grads[len(rep):]

    def _shared_grads(self) -> list[Tensor]:
        """``[T, *shape]`` per shared parameter."""
        if self._representation is not None:
            self._heads()
            assert self._rep_grads is not None
            if self._path == "loop":
                return self._trunk_loop()
            trunk, rep_grads = self._differentiable_trunk()
            if not trunk:
                return [_zeros_batched(self.num_tasks, p) for p in self._shared]
            return self._batched_or_zeros(self._shared, self._vmapped(lambda: torch.autograd.grad(
                trunk, self._shared, grad_outputs=rep_grads, retain_graph=True,
                allow_unused=True, is_grads_batched=True,
            )))
        if self._path == "loop":
            grads = self._per_task_loop([*self._shared, *self._task_specific])
        else:
            grads = self._batched_from_losses([*self._shared, *self._task_specific])
        self._head_grads = grads[len(self._shared):]
        return grads[: len(self._shared)]

    def _differentiable_trunk(self) -> tuple[list[Tensor], list[Tensor]]:
        """The trunk tensors that require grad (a frozen stage's output does not) and their ``[T, ...]``
        representation gradients."""
        assert self._trunk is not None and self._rep_grads is not None
        pairs = [(t, g) for t, g in zip(self._trunk, self._rep_grads) if t.requires_grad]
        return [t for t, _ in pairs], [g for _, g in pairs]

    def _trunk_loop(self) -> list[Tensor]:
        trunk, rep_grads = self._differentiable_trunk()
        if not trunk:
            return [_zeros_batched(self.num_tasks, p) for p in self._shared]
        rows = [
            torch.autograd.grad(
                trunk, self._shared, grad_outputs=[g[t] for g in rep_grads],
                retain_graph=True, allow_unused=True, materialize_grads=True,
            )
            for t in range(self.num_tasks)
        ]
        return [torch.stack([row[i] for row in rows]) for i in range(len(self._shared))]

    # ----------------------------------------------------------------------------- path "layers"
    @staticmethod
    def _rule(module: nn.Module) -> LayerRule:
        rule = rule_for(module)
        assert rule is not None, f"{type(module).__name__} was tapped without a layer rule"
        return rule

    def _layer_backward(self) -> None:
        """One vmapped backward into the tapped layers' outputs and the other shared parameters (and, without
        a representation, the task-specific ones): autograd forms no per-task weight gradient of a tapped
        layer. The graph is freed: everything the step needs from the trunk is in what it returns."""
        if self._output_grads is not None:
            return
        assert self._calls is not None
        edges: list[Tensor | GradientEdge] = [call.output for call in self._calls]
        num_tasks = self.num_tasks
        if self._representation is not None:
            self._heads()
            trunk, rep_grads = self._differentiable_trunk()
            targets: list[Tensor | GradientEdge] = [*edges, *self._untapped]
            grads: Sequence[Tensor | None] = [None] * len(targets)
            if trunk:
                grads = self._vmapped(lambda: torch.autograd.grad(
                    trunk, targets, grad_outputs=rep_grads, allow_unused=True, is_grads_batched=True,
                ))
        else:
            targets = [*edges, *self._untapped, *self._task_specific]
            grads = [None] * len(targets)
            if self._losses.requires_grad:
                eye = torch.eye(num_tasks, dtype=self._losses.dtype, device=self._losses.device)
                grads = self._vmapped(lambda: torch.autograd.grad(
                    self._losses, targets, grad_outputs=eye, allow_unused=True, is_grads_batched=True,
                ))
            self._head_grads = [
                g if g is not None else _zeros_batched(num_tasks, p)
                for g, p in zip(grads[len(edges) + len(self._untapped):], self._task_specific)
            ]
        like = self._losses
        self._output_grads = [
            g if g is not None else torch.zeros((num_tasks, *call.output_shape), dtype=like.dtype, device=like.device)
            for g, call in zip(grads[: len(edges)], self._calls)
        ]
        self._untapped_grads = [
            g if g is not None else _zeros_batched(num_tasks, p)
            for g, p in zip(grads[len(edges): len(edges) + len(self._untapped)], self._untapped)
        ]

    def _layer_task_gradients(self, module: nn.Module) -> list[Tensor]:
        """``[T, *shape]`` per parameter of ``module``, summed over its calls, reduced."""
        assert self._calls is not None and self._output_grads is not None
        rule, total = self._rule(module), None
        for index in self._layer_groups[module]:
            grads = rule.task_gradients(module, self._calls[index].checked_input(), self._output_grads[index])
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        assert total is not None
        return [self._reduce(g) for g in total]

    def _layer_blocks(self) -> list[Tensor]:
        """Every block at once (``[T, *shape]`` per shared parameter); from here on they answer every request."""
        blocks = [
            block.view(self.num_tasks, *param.shape)
            for (_, block), param in zip(self._layer_blocks_lazily(release=False), self._shared)
        ]
        self._calls = self._output_grads = self._untapped_grads = None
        self._layer_groups = {}
        return blocks

    def _layer_blocks_lazily(self, release: bool) -> Iterator[tuple[slice, Tensor]]:
        """The Jacobian's per-parameter blocks in order, each formed when reached (a tapped layer's from its
        activations) and dropped once the caller moves on: no ``[T, P]`` array is ever held. The layer data
        stay for the weighted update, unless ``release``."""
        self._layer_backward()
        assert self._calls is not None and self._output_grads is not None and self._untapped_grads is not None
        if release:
            self._released = True
        untapped = dict(zip(map(id, self._untapped), self._untapped_grads))
        owner = {id(p): m for m in self._layer_groups for p in self._rule(m).parameters(m)}
        pending: dict[int, Tensor] = {}
        start = 0
        for param in self._shared:
            key = id(param)
            if key in untapped:
                block = self._reduce(untapped[key].float())
            else:
                if key not in pending:
                    module = owner[key]
                    params = self._rule(module).parameters(module)
                    pending.update(zip(map(id, params), self._layer_task_gradients(module)))
                block = pending.pop(key)
            block = block.reshape(self.num_tasks, -1)
            yield slice(start, start + block.shape[1]), block
            start += block.shape[1]
            del block
        if release:
            self._calls = self._output_grads = self._untapped_grads = None
            self._layer_groups = {}

    def _layer_gramian(self) -> Tensor:
        """``K`` layer by layer: a tapped layer's term from its activations where that is cheaper (and exact:
        one call, no cross-process reduction), else from its per-task weight gradients, formed and dropped."""
        self._layer_backward()
        assert self._calls is not None and self._output_grads is not None and self._untapped_grads is not None
        num_tasks, dtype = self.num_tasks, self._gramian_dtype
        gram = torch.zeros(num_tasks, num_tasks, dtype=dtype, device=self._losses.device)

        def add(blocks: Sequence[Tensor]) -> None:
            nonlocal gram
            for block in blocks:
                flat = block.reshape(num_tasks, -1).to(dtype)
                gram = gram + flat @ flat.T

        add([self._reduce(g.float()) for g in self._untapped_grads])
        for module, indices in self._layer_groups.items():
            rule = self._rule(module)
            call, grads = self._calls[indices[0]], self._output_grads[indices[0]]
            if self._reduce_is_identity and len(indices) == 1 and rule.prefers_activations(module, grads):
                gram = gram + rule.gramian_by_activations(module, call.checked_input(), grads, dtype)
            else:
                add(self._layer_task_gradients(module))
        return gram

    def _layer_weighted(self, weights: Tensor) -> Iterator[Tensor]:
        """``Σ_t w_t ∂L_t/∂θ`` per shared parameter: a tapped layer's from ``Σ_t w_t B_t`` (one weight gradient
        per call); the per-call output gradients are released as they are used."""
        self._layer_backward()
        assert self._calls is not None and self._output_grads is not None and self._untapped_grads is not None
        calls, outputs = self._calls, self._output_grads
        by_param = {
            id(p): self._reduce(torch.tensordot(weights.to(g.device, g.dtype), g, dims=1))
            for p, g in zip(self._untapped, self._untapped_grads)
        }
        self._untapped_grads = None
        for module, indices in self._layer_groups.items():
            rule, total = self._rule(module), None
            for index in indices:
                grad = outputs[index]
                combined = torch.tensordot(weights.to(grad.device, grad.dtype), grad, dims=1)
                outputs[index] = grad.new_empty(0)
                del grad
                result = rule.weighted_gradients(module, calls[index].checked_input(), combined)
                calls[index] = calls[index].released()  # its input activation is needed no more
                total = result if total is None else [a + b for a, b in zip(total, result)]
            assert total is not None
            by_param.update(zip(map(id, rule.parameters(module)), (self._reduce(g) for g in total)))
        self._output_grads = None
        for param in self._shared:
            yield by_param.pop(id(param))

    # ------------------------------------------------------------------------------------ public views
    def representation_jacobian(self) -> Tensor:
        """``[T, R]`` float32: row t is ``∂L_t/∂rep`` flattened over every representation tensor (batch
        included). Available whenever the engine was given the representation; cheap (heads only)."""
        if self._representation is None:
            raise ConfigError("representation_jacobian() needs the engine to be given the shared representation")
        self._heads()
        assert self._rep_grads is not None
        return torch.cat([g.reshape(self.num_tasks, -1) for g in self._rep_grads], dim=1).float()

    def shared_blocks(self) -> list[Tensor]:
        """The Jacobian of the shared parameters as one ``[T, *shape]`` float32 block per parameter, each
        after ``reduce`` (an all-reduce mean is exact block by block). The Gramian and the weighted update
        are built from the blocks, so the flat ``[T, P]`` copy exists only if a balancer asks for it."""
        self._check_not_released()
        if self._blocks is None:
            if self._calls is not None:
                self._blocks = self._layer_blocks()
            else:
                self._blocks = [self._reduce(g.float()) for g in self._shared_grads()]
        return self._blocks

    def jacobian(self) -> Tensor:
        """``G`` [T, P] in float32 (also under autocast), after ``reduce``. In representation mode, the
        representation Jacobian (not reduced: its rows are over this process's samples)."""
        self._check_not_released()
        if self._jacobian is None:
            if self._representation_mode:
                self._jacobian = self.representation_jacobian()
            else:
                self._jacobian = torch.cat([b.reshape(self.num_tasks, -1) for b in self.shared_blocks()], dim=1)
                self._blocks = None  # the flat matrix replaces the blocks; the update uses views of it
        return self._jacobian

    def gramian(self) -> Tensor:
        """``K = G Gᵀ`` [T, T] in the engine's ``gramian_dtype``, accumulated block by block in parameter mode
        (from the reduced Jacobian). Representation mode: ``reduce`` is applied to K (the Gramian of every
        process's representation gradients together is the sum of the per-process Gramians)."""
        if self._gramian is None:
            self._check_not_released()
            if self._representation_mode:
                jac = self.jacobian().to(self._gramian_dtype)
                self._gramian = self._reduce(jac @ jac.T)
            elif self._jacobian is not None:
                jac = self._jacobian.to(self._gramian_dtype)
                self._gramian = jac @ jac.T
            elif self._calls is not None:
                self._gramian = self._layer_gramian()
            else:
                gram = torch.zeros(
                    self.num_tasks, self.num_tasks, dtype=self._gramian_dtype, device=self._losses.device
                )
                for block in self.shared_blocks():
                    flat = block.reshape(self.num_tasks, -1).to(self._gramian_dtype)
                    gram += flat @ flat.T
                self._gramian = gram
        return self._gramian

    def jacobian_blocks(self, release: bool = False) -> Iterator[tuple[slice, Tensor]]:
        """One ``[T, n]`` block per shared parameter (views of the flat Jacobian once it exists), so that a
        balancer's per-task state is updated without a ``[T, P]`` temporary; see
        :meth:`TaskGradients.jacobian_blocks`. Representation mode: the representation Jacobian whole."""
        self._check_not_released()
        if self._representation_mode:
            yield from super().jacobian_blocks(release)
            return
        if self._calls is not None and self._blocks is None:
            yield from self._layer_blocks_lazily(release)
            return
        if self._jacobian is not None:
            blocks = list(torch.split(self._jacobian, [p.numel() for p in self._shared], dim=1))
        else:
            blocks = [b.reshape(self.num_tasks, -1) for b in self.shared_blocks()]
        if release:
            self._released = True
            self._jacobian = self._blocks = None
        start = 0
        for index in range(len(blocks)):
            block = blocks[index]
            if release:
                blocks[index] = block.new_empty(0)  # drop the list's reference: freed once the caller moves on
            yield slice(start, start + block.shape[1]), block
            start += block.shape[1]
            del block

    def consume_weighted_shared(self, weights: Tensor) -> Iterator[Tensor]:
        """``Σ_t w_t ∂L_t/∂θ`` for every shared parameter, from the known Jacobian. Each per-parameter block
        is released once used, so that the step's peak memory holds the blocks or the new ``.grad``, not both;
        the object answers no further Jacobian or Gramian requests afterwards."""
        if self._jacobian is not None:
            yield from _split_like(weights.to(self._jacobian.device) @ self._jacobian, self._shared)
            return
        if self._calls is not None and self._blocks is None:
            yield from self._layer_weighted(weights)
            return
        blocks = self.shared_blocks()
        self._blocks = None
        while blocks:
            block = blocks.pop(0)
            yield torch.tensordot(weights.to(block.device), block, dims=1)
            del block

    def head_grads(self) -> list[Tensor] | None:
        """Per task-specific parameter ``[T, *shape]``, once the heads have been differentiated."""
        return self._head_grads

    def _check_not_released(self) -> None:
        if self._released:
            raise ConfigError(
                "the step's shared-parameter Jacobian was released by jacobian_blocks(release=True); a balancer "
                "that releases it must return Update.direction and ask for nothing more"
            )

    def ensure_heads(self) -> list[Tensor]:
        if self._head_grads is None:
            if self._representation is not None:
                self._heads()
            elif self._calls is not None:
                self._layer_backward()
            else:
                self.jacobian()
        assert self._head_grads is not None
        return self._head_grads


def resolve_jacobian_path(requested: str, balancer: Balancer, mode: str, taps_possible: bool) -> JacobianPath:
    """``balancer.jacobian: auto``: ``"layers"`` for a gradient method in parameter mode when the model has
    layers to tap (``taps_possible``: some, and no compiled forward), else ``"batched"``. Gramian methods then
    never hold the Jacobian, methods that read it block by block hold one layer's block at a time, and both
    are faster than through the vmapped parameter backward (docs/balancers.md). An explicit choice is
    returned as it is."""
    if requested != "auto":
        if requested not in ("batched", "loop", "layers"):
            raise ConfigError(f"balancer.jacobian must be 'auto', 'batched', 'layers' or 'loop', got {requested!r}")
        return requested  # type: ignore[return-value]
    if balancer.needs is not Needs.LOSSES and mode == "params" and taps_possible:
        return "layers"
    return "batched"


def _accumulate(param: Tensor, grad: Tensor, owned: bool = True) -> None:
    """Add ``grad`` into ``param.grad``; a tensor the engine does not own (a balancer's direction) is copied."""
    grad = grad.detach().to(param.dtype)
    if param.grad is None:
        param.grad = grad if owned else grad.clone()
    else:
        param.grad.add_(grad)


def _split_like(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    sizes = [p.numel() for p in params]
    return [chunk.view_as(p) for chunk, p in zip(torch.split(flat, sizes), params)]


class GradientEngine:
    """Computes one step's gradients for a balancer and accumulates them into ``.grad``.

    ``shared`` are the parameters every task depends on; ``task_specific`` the rest (the heads);
    ``representation`` the shared representation tensors of this step, as the heads consumed them. When
    they were cut from the trunk (:class:`~mtlvision.models.multitask.CutRepresentation`: detached copies,
    needed whenever one tensor is computed from another, as a backbone's stage outputs are), ``trunk`` gives
    the tensors they were cut from, and gradients reach the shared parameters through those.

    - ``mode``: ``"representation"`` (MGDA-UB style: gradient methods see the per-task gradients of the
      representation; only balancers with ``supports_representation``) or ``"params"`` (the per-task
      gradients of the shared parameters; a representation, when given, only speeds their computation up).
      Default: ``"representation"`` when a representation is given, else ``"params"``.
    - ``jacobian``: ``"batched"`` (one vmapped trunk backward, the default), ``"layers"`` (the same backward
      stopped at the outputs of the layers ``taps`` recorded: their per-task weight gradients, Gramian and
      weighted update come from activations, see :mod:`mtlvision.balancers.layers`; parameter mode only) or
      ``"loop"`` (T plain backward passes, for operations without a vmap batching rule).
    - ``taps``: the :class:`~mtlvision.balancers.layers.LayerTaps` whose recording the step's forward ran in;
      needed by ``jacobian="layers"``.
    - ``reduce``: applied to the shared-parameter Jacobian (representation mode: to the Gramian) before the
      balancer sees it, e.g. an all-reduce mean across ranks in distributed training. None (the default):
      nothing to reduce, which also lets ``"layers"`` form a layer's Gramian term from activations.
    - ``gramian_dtype``: float32 (default) or float64 for ``TaskGradients.gramian()``.
    """

    def __init__(
        self,
        shared: Sequence[nn.Parameter],
        task_specific: Sequence[nn.Parameter],
        representation: Sequence[Tensor] | Tensor | None = None,
        *,
        trunk: Sequence[Tensor] | None = None,
        mode: Literal["params", "representation"] | None = None,
        jacobian: JacobianPath = "batched",
        taps: LayerTaps | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        gramian_dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(representation, Tensor):
            representation = [representation]
        self.representation = list(representation) if representation is not None else None
        if trunk is not None and (
            self.representation is None
            or [t.shape for t in trunk] != [r.shape for r in self.representation]
        ):
            raise ConfigError("the trunk tensors must match the representation tensors cut from them, shape by shape")
        self.trunk = list(trunk) if trunk is not None else self.representation
        mode = mode or ("representation" if self.representation is not None else "params")
        if mode not in ("params", "representation"):
            raise ConfigError(f"balancer.mode must be 'params' or 'representation', got {mode!r}")
        if mode == "representation" and self.representation is None:
            raise ConfigError("representation mode needs the shared representation tensors of the step")
        if jacobian not in ("batched", "loop", "layers"):
            raise ConfigError(f"balancer.jacobian must be 'batched', 'layers' or 'loop', got {jacobian!r}")
        if jacobian == "layers" and taps is None:
            raise ConfigError("GradientEngine(jacobian='layers') needs the LayerTaps the step's forward recorded in")
        if gramian_dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"the Gramian dtype must be float32 or float64, got {gramian_dtype}")
        self.shared = [p for p in shared if p.requires_grad]
        self.task_specific = [p for p in task_specific if p.requires_grad]
        self.mode = mode
        self.jacobian_path: JacobianPath = jacobian
        self.taps = taps
        self.reduce = reduce
        self.gramian_dtype = gramian_dtype

    def backward(self, losses: Tensor, balancer: Balancer) -> Update:
        """Run ``balancer`` on ``losses`` [T] and accumulate the resulting update into ``.grad``.

        Pass ``losses`` as ``torch.stack`` of the per-task losses: the engine then differentiates each task
        from its own loss node and never walks another task's head."""
        if losses.dim() != 1:
            raise ConfigError(f"the engine expects a vector of T task losses, got shape {tuple(losses.shape)}")
        name = type(balancer).__name__
        representation_mode = self.mode == "representation"
        if representation_mode and not balancer.supports_representation:
            raise ConfigError(
                f"balancer {name} is not defined on gradients of the shared representation; use balancer.mode=params"
            )
        grads: _StepGradients | None = None
        if balancer.needs is not Needs.LOSSES:
            if not representation_mode and not self.shared:
                raise ConfigError(
                    f"balancer {name} needs per-task gradients ({balancer.needs.value}) but the engine was given "
                    "no shared parameters that require grad"
                )
            grads = _StepGradients(
                losses, self.shared, self.task_specific, self.representation, self.trunk, representation_mode,
                self.jacobian_path, self.reduce, self.gramian_dtype, self._layer_calls(representation_mode),
            )
        update = balancer.balance(losses, grads)
        if (update.direction is not None or update.shared_weights is not None) and grads is None:
            raise ConfigError(f"balancer {name} needs only losses, so it cannot return a direction or shared weights")
        if update.shared_weights is not None and not (grads is not None and grads.jacobian_known):
            raise ConfigError(
                f"balancer {name} returned shared_weights without asking for the per-task gradients first"
            )
        if grads is not None and (grads.jacobian_known or update.direction is not None):
            self._apply_from_jacobian(update, grads)
        else:
            weights = update.weights.detach().to(device=losses.device, dtype=losses.dtype)
            if losses.requires_grad:
                self._backward_weighted((weights * losses).sum())
        if update.extra_loss is not None:
            own = [p for p in balancer.parameters() if p.requires_grad]
            if not own:
                raise ConfigError(f"balancer {name} returned an extra_loss but has no learnable parameters")
            torch.autograd.backward(update.extra_loss, inputs=own)
        return update

    def _layer_calls(self, representation_mode: bool) -> list[LayerCall] | None:
        """The tapped layer calls of this step (path ``"layers"`` in parameter mode), else None."""
        if self.jacobian_path != "layers":
            return None
        assert self.taps is not None
        calls = self.taps.take()
        if representation_mode:
            return None
        if not calls:
            raise ConfigError(
                "GradientEngine(jacobian='layers') found no layer call recorded in this step's forward: run the "
                "forward inside taps.recording(), with gradients enabled"
            )
        return calls

    def _backward_weighted(self, total: Tensor) -> None:
        """Accumulate ``∂total/∂θ`` into every parameter's ``.grad``, across the cut when there is one."""
        if self.trunk is self.representation:
            if self.shared or self.task_specific:
                torch.autograd.backward(total, inputs=self.shared + self.task_specific)
            return
        assert self.representation is not None
        inputs = [*self.task_specific, *self.representation]
        grads = torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True)
        for param, g in zip(self.task_specific, grads):
            _accumulate(param, g)
        self._through_trunk(grads[len(self.task_specific):])

    def _through_trunk(self, rep_grads: Sequence[Tensor]) -> None:
        """Back-propagate gradients of the representation into the shared parameters' ``.grad``."""
        assert self.trunk is not None
        pairs = [(t, g.to(t.dtype)) for t, g in zip(self.trunk, rep_grads) if t.requires_grad]
        if self.shared and pairs:
            torch.autograd.backward([t for t, _ in pairs], grad_tensors=[g for _, g in pairs], inputs=self.shared)

    def _apply_from_jacobian(self, update: Update, grads: _StepGradients) -> None:
        """The update from the per-task gradients already computed: no second backward through the trunk."""
        weights = update.weights.detach().float()
        for param, g in zip(self.task_specific, grads.ensure_heads()):
            _accumulate(param, torch.tensordot(weights.to(device=g.device, dtype=g.dtype), g, dims=1))
        if update.shared_weights is not None:
            weights = update.shared_weights.detach().float()
            if weights.shape != update.weights.shape:
                raise ConfigError(
                    f"the balancer's shared_weights have shape {tuple(weights.shape)} but its weights "
                    f"{tuple(update.weights.shape)}"
                )
        if self.mode == "representation":
            assert self.representation is not None
            flat = update.direction if update.direction is not None else weights @ grads.representation_jacobian()
            if flat.shape != (sum(r.numel() for r in self.representation),):
                raise ConfigError(
                    f"the balancer's direction has shape {tuple(flat.shape)} but the representation has "
                    f"{sum(r.numel() for r in self.representation)} entries"
                )
            parts = _split_like(flat.detach(), self.representation)
            self._through_trunk(parts)
            return
        if update.direction is None:
            for param, g in zip(self.shared, grads.consume_weighted_shared(weights)):
                _accumulate(param, g)
            return
        numel = sum(p.numel() for p in self.shared)
        if update.direction.shape != (numel,):
            raise ConfigError(
                f"the balancer's direction has shape {tuple(update.direction.shape)} but the shared parameters "
                f"have {numel} entries"
            )
        for param, g in zip(self.shared, _split_like(update.direction.detach(), self.shared)):
            _accumulate(param, g, owned=False)
