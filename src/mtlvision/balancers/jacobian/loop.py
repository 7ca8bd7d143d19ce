"""``jacobian="loop"``: the per-task gradients of the shared parameters from T plain ``autograd.grad`` calls.

For an operation without a vmap batching rule; the batched path never silently falls back to it. Without a
representation, task t's call starts from its own loss node and reaches the shared and task-specific
parameters; with one, the heads are differentiated first and task t's call starts from the trunk with its
representation gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlvision.balancers.jacobian.base import ParameterGradients, zeros_batched


class LoopGradients(ParameterGradients):
    """The Jacobian's blocks from one backward per task."""

    def _compute_blocks(self) -> list[Tensor]:
        if self._representation is not None:
            grads = self._trunk_loop()
        else:
            grads = self._per_task_loop([*self._shared, *self._task_specific])
            self._head_grads = grads[len(self._shared) :]
            grads = grads[: len(self._shared)]
        return [self._reduce(g.float()) for g in grads]

    def _trunk_loop(self) -> list[Tensor]:
        trunk, rep_grads = self._differentiable_trunk()
        if not trunk:
            return [zeros_batched(self.num_tasks, p) for p in self._shared]
        rows = [
            torch.autograd.grad(
                trunk,
                self._shared,
                grad_outputs=[g[t] for g in rep_grads],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for t in range(self.num_tasks)
        ]
        return [torch.stack([row[i] for row in rows]) for i in range(len(self._shared))]
