"""What every Jacobian path shares: a step's inputs, the heads, and parameter mode's blocks and views.

:class:`StepGradients` is the engine's side of :class:`~mtlvision.balancers.base.TaskGradients`: it adds the
per-task gradients of the task-specific parameters (:meth:`~StepGradients.ensure_heads`) and whether the
per-task gradients have been computed (:attr:`~StepGradients.jacobian_known`). :class:`ParameterGradients`
is the base of every path: it holds the Jacobian of the shared parameters as per-parameter blocks or as the
flat ``[T, P]`` matrix and answers every view (Jacobian, Gramian, blocks, weighted update) from them; a path
says how the blocks are computed and may answer the views before any block exists.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from mtlvision.balancers.base import TaskGradients
from mtlvision.balancers.jacobian.vmap import batched_backward
from mtlvision.balancers.layers import LayerTaps
from mtlvision.errors import InternalError


@dataclass(frozen=True)
class Step:
    """What one step's per-task gradients are computed from.

    ``representation``: the shared representation tensors as the heads consumed them (None: not given);
    ``trunk``: the tensors they were cut from, through which gradients reach the shared parameters (the
    representation itself when it was not cut). ``reduce``: applied to the shared-parameter Jacobian
    (representation mode: to the Gramian); None: nothing to reduce."""

    losses: Tensor
    shared: Sequence[Tensor]
    task_specific: Sequence[Tensor]
    representation: Sequence[Tensor] | None = None
    trunk: Sequence[Tensor] | None = None
    reduce: Callable[[Tensor], Tensor] | None = None
    gramian_dtype: torch.dtype = torch.float32


def task_outputs(losses: Tensor) -> list[Tensor | GradientEdge | None]:
    """One differentiable output per task: the loss node that fed ``torch.stack`` where there is one (so
    task t back-propagates through its own head only), else ``losses[t]``; None for a constant loss."""
    node = losses.grad_fn
    if node is not None and type(node).__name__ == "StackBackward0" and len(node.next_functions) == len(losses):
        return [GradientEdge(fn, nr) if fn is not None else None for fn, nr in node.next_functions]
    if not losses.requires_grad:
        return [None] * len(losses)
    return [losses[t] for t in range(len(losses))]


def zeros_batched(num_tasks: int, like: Tensor) -> Tensor:
    return torch.zeros((num_tasks, *like.shape), dtype=like.dtype, device=like.device)


def split_like(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``flat`` cut into one view per parameter, shaped like it."""
    sizes = [p.numel() for p in params]
    return [chunk.view_as(p) for chunk, p in zip(torch.split(flat, sizes), params)]


class StepGradients(TaskGradients):
    """Per-task gradients of one step, each computed at most once, on the device of the model."""

    def __init__(self, step: Step) -> None:
        self._losses = step.losses
        self._outputs = task_outputs(step.losses)
        self._task_specific = list(step.task_specific)
        self._representation = list(step.representation) if step.representation is not None else None
        self._trunk = list(step.trunk) if step.trunk is not None else self._representation
        self._reduce: Callable[[Tensor], Tensor] = step.reduce if step.reduce is not None else (lambda t: t)
        self._reduce_is_identity = step.reduce is None
        self._gramian_dtype = step.gramian_dtype
        self._rep_grads: list[Tensor] | None = None  # per representation tensor: [T, *shape]
        self._head_grads: list[Tensor] | None = None  # per task-specific parameter: [T, *shape]
        self._gramian: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return int(self._losses.numel())

    @property
    @abstractmethod
    def jacobian_known(self) -> bool:
        """Whether the per-task gradients were computed (so the update needs no backward of the weighted loss)."""

    def ensure_heads(self) -> list[Tensor]:
        """Per task-specific parameter ``[T, *shape]``, computed if not yet."""
        if self._head_grads is None:
            self._compute_heads()
        assert self._head_grads is not None
        return self._head_grads

    @abstractmethod
    def _compute_heads(self) -> None:
        """Set ``_head_grads``."""

    def _zeros_where_none(self, grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
        """``[T, *shape]`` per tensor of ``like``; zeros where no loss reaches it (``materialize_grads`` would
        give an unbatched zero under a vmapped backward)."""
        return [g if g is not None else zeros_batched(self.num_tasks, x) for g, x in zip(grads, like)]

    def _per_task_loop(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """``[T, *shape]`` per input, by one ``autograd.grad`` call per task from its own loss node."""
        rows: list[list[Tensor]] = []
        for out in self._outputs:
            if out is None:
                rows.append([torch.zeros_like(x) for x in inputs])
                continue
            grad_out = torch.ones((), dtype=self._losses.dtype, device=self._losses.device)
            # autograd takes tensors and gradient edges mixed; its stubs want one kind per call
            outputs: Any = [out]
            grads = torch.autograd.grad(
                outputs,
                list(inputs),
                grad_outputs=[grad_out],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            rows.append(list(grads))
        return [torch.stack([row[i] for row in rows]) for i in range(len(inputs))]

    def _heads(self) -> None:
        """Per-task gradients of the representation and of the task-specific parameters (each task walks
        its own head only)."""
        if self._head_grads is not None:
            return
        rep = self._representation or []
        grads = self._per_task_loop([*rep, *self._task_specific])
        self._rep_grads = grads[: len(rep)]
        self._head_grads = grads[len(rep) :]

    def _differentiable_trunk(self) -> tuple[list[Tensor], list[Tensor]]:
        """The trunk tensors that require grad (a frozen stage's output does not) and their ``[T, ...]``
        representation gradients."""
        self._heads()
        assert self._trunk is not None and self._rep_grads is not None
        pairs = [(t, g) for t, g in zip(self._trunk, self._rep_grads) if t.requires_grad]
        return [t for t, _ in pairs], [g for _, g in pairs]


class ParameterGradients(StepGradients):
    """Parameter mode: ``G`` is over the shared parameters; the base of every Jacobian path.

    A path implements :meth:`_compute_blocks` and may override the ``_fresh_*`` methods, which answer a view
    while no block is held (the layer path forms its Gramian and update without ever holding them). A
    representation, when the step has one, is a parameter of the path, not a mode: the path's backward then
    starts from the trunk with the per-task representation gradients instead of from the T losses.
    """

    #: whether the path needs the :class:`~mtlvision.balancers.layers.LayerTaps` of the step's forward.
    uses_taps: ClassVar[bool] = False
    #: the way of :data:`BATCHED_BACKWARDS` this path's vmapped backward takes under ``BACKWARD_VMAP["way"]="auto"``
    vmap_way: ClassVar[str] = "autograd"

    @classmethod
    def for_step(cls, step: Step, taps: LayerTaps | None) -> ParameterGradients:
        """The path's per-task gradients of ``step``, whose forward ran in ``taps`` (where the path uses it)."""
        return cls(step)

    def __init__(self, step: Step) -> None:
        super().__init__(step)
        self._shared = list(step.shared)
        self._jacobian: Tensor | None = None
        self._blocks: list[Tensor] | None = None  # per shared parameter: [T, *shape], float32, reduced
        self._released = False  # set by jacobian_blocks(release=True): the Jacobian is gone
        #: keep the trunk's graph after the backward (set while ``balancer.jacobian=auto`` times the path)
        self.keep_graph = False

    @property
    def num_columns(self) -> int:
        return sum(p.numel() for p in self._shared)

    @property
    def jacobian_known(self) -> bool:
        return self._jacobian is not None or self._blocks is not None

    # ------------------------------------------------------------------------------------ what a path says
    @abstractmethod
    def _compute_blocks(self) -> list[Tensor]:
        """``[T, *shape]`` float32 per shared parameter, after ``reduce``; also sets ``_head_grads`` where
        the same backward gives them."""

    def _compute_heads(self) -> None:
        if self._representation is not None:
            self._heads()
        else:
            self.shared_blocks()

    def _fresh_blocks(self, release: bool) -> Iterator[tuple[slice, Tensor]]:
        """:meth:`jacobian_blocks` while no block is held."""
        self.shared_blocks()
        return self._held_blocks(release)

    def _fresh_gramian(self) -> Tensor:
        """:meth:`gramian` while no block is held."""
        return self._gramian_of(self.shared_blocks())

    def _fresh_weighted(self, weights: Tensor) -> Iterator[Tensor]:
        """:meth:`consume_weighted_shared` while no block is held."""
        self.shared_blocks()
        return self._weighted_held(weights)

    def _batched_backward(
        self,
        targets: Sequence[Tensor | GradientEdge],
        *,
        retain_graph: bool,
        reduced: bool = False,
        key: tuple[Any, ...] = (),
    ) -> list[Tensor | None]:
        """``[T, *shape]`` per target (None where no loss reaches it) by one vmapped backward: from the trunk
        with the per-task representation gradients as batched ``grad_outputs`` when the step has a
        representation (its heads differentiated first), else from the T losses, then also into the
        task-specific parameters, whose per-task gradients are kept. ``reduced``, ``key``: see
        :func:`batched_backward`."""
        if self._representation is not None:
            roots, grad_outputs = self._differentiable_trunk()
            wanted = list(targets)
        else:
            roots, wanted = ([self._losses] if self._losses.requires_grad else []), [*targets, *self._task_specific]
            grad_outputs = [torch.eye(self.num_tasks, dtype=self._losses.dtype, device=self._losses.device)]
        grads: Sequence[Tensor | None] = [None] * len(wanted)
        if roots:
            grads = batched_backward(
                roots, wanted, grad_outputs, retain=retain_graph, reduced=reduced, preferred=self.vmap_way, key=key
            )
        if self._representation is None:
            self._head_grads = self._zeros_where_none(grads[len(targets) :], self._task_specific)
        return list(grads[: len(targets)])

    # ------------------------------------------------------------------------------------ views
    def _check_not_released(self) -> None:
        if self._released:
            raise InternalError(
                "the step's shared-parameter Jacobian was released by jacobian_blocks(release=True); a balancer "
                "that releases it must return Update.direction and ask for nothing more"
            )

    def shared_blocks(self) -> list[Tensor]:
        """The Jacobian of the shared parameters as one ``[T, *shape]`` float32 block per parameter, each
        after ``reduce`` (an all-reduce mean is exact block by block). The Gramian and the weighted update
        are built from the blocks, so the flat ``[T, P]`` copy exists only if a balancer asks for it."""
        self._check_not_released()
        if self._blocks is None:
            self._blocks = self._compute_blocks()
        return self._blocks

    def jacobian(self) -> Tensor:
        """``G`` [T, P] in float32 (also under autocast), after ``reduce``."""
        self._check_not_released()
        if self._jacobian is None:
            self._jacobian = torch.cat([b.reshape(self.num_tasks, -1) for b in self.shared_blocks()], dim=1)
            self._blocks = None  # the flat matrix replaces the blocks; the update uses views of it
        return self._jacobian

    def gramian(self) -> Tensor:
        """``K = G Gᵀ`` [T, T] in the engine's ``gramian_dtype``, accumulated block by block (from the
        reduced Jacobian)."""
        if self._gramian is None:
            self._check_not_released()
            if self._jacobian is not None:
                jac = self._jacobian.to(self._gramian_dtype)
                self._gramian = jac @ jac.T
            elif self._blocks is None:
                self._gramian = self._fresh_gramian()
            else:
                self._gramian = self._gramian_of(self._blocks)
        return self._gramian

    def _gramian_of(self, blocks: Sequence[Tensor]) -> Tensor:
        gram = torch.zeros(self.num_tasks, self.num_tasks, dtype=self._gramian_dtype, device=self._losses.device)
        for block in blocks:
            flat = block.reshape(self.num_tasks, -1).to(self._gramian_dtype)
            gram += flat @ flat.T
        return gram

    def jacobian_blocks(self, release: bool = False) -> Iterator[tuple[slice, Tensor]]:
        """One ``[T, n]`` block per shared parameter (views of the flat Jacobian once it exists), so that a
        balancer's per-task state is updated without a ``[T, P]`` temporary; see
        :meth:`TaskGradients.jacobian_blocks`."""
        self._check_not_released()
        if self._jacobian is None and self._blocks is None:
            yield from self._fresh_blocks(release)
            return
        yield from self._held_blocks(release)

    def _held_blocks(self, release: bool) -> Iterator[tuple[slice, Tensor]]:
        if self._jacobian is not None:
            blocks = list(torch.split(self._jacobian, [p.numel() for p in self._shared], dim=1))
        else:
            assert self._blocks is not None
            blocks = [b.reshape(self.num_tasks, -1) for b in self._blocks]
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
        self._check_not_released()
        if self._jacobian is not None:
            yield from split_like(weights.to(self._jacobian.device) @ self._jacobian, self._shared)
            return
        if self._blocks is None:
            yield from self._fresh_weighted(weights)
            return
        yield from self._weighted_held(weights)

    def _weighted_held(self, weights: Tensor) -> Iterator[Tensor]:
        blocks, self._blocks = self._blocks, None
        assert blocks is not None
        while blocks:
            block = blocks.pop(0)
            yield torch.tensordot(weights.to(block.device), block, dims=1)
            del block
