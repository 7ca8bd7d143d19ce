"""The gradient engine: turns a balancer's :class:`Update` into ``.grad`` on every parameter.

It knows no model: only the list of shared parameters, the list of task-specific parameters and, in
representation mode, the shared representation tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlvision.balancers.base import Balancer, Needs, TaskGradients, Update


class _LazyTaskGradients(TaskGradients):
    """Per-task gradients computed on first request, then cached for the step."""

    def __init__(self, losses: Tensor, inputs: Sequence[Tensor]) -> None:
        self._losses = losses
        self._inputs = list(inputs)
        self._jacobian: Tensor | None = None
        self._gramian: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return int(self._losses.numel())

    def jacobian(self) -> Tensor:
        if self._jacobian is None:
            rows = []
            for loss in self._losses:
                grads = torch.autograd.grad(loss, self._inputs, retain_graph=True, allow_unused=True)
                rows.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(grads, self._inputs)
                        ]
                    )
                )
            self._jacobian = torch.stack(rows)
        return self._jacobian

    def gramian(self) -> Tensor:
        if self._gramian is None:
            jac = self.jacobian().float()
            self._gramian = jac @ jac.T
        return self._gramian


class GradientEngine:
    """Computes one step's gradients for a balancer.

    ``shared`` are the parameters every task depends on; ``task_specific`` the rest. With
    ``representation`` given, gradient methods work on the per-task gradients of those tensors instead
    of the shared parameters (MGDA-UB style).
    """

    def __init__(
        self,
        shared: Sequence[nn.Parameter],
        task_specific: Sequence[nn.Parameter],
        representation: Sequence[Tensor] | None = None,
    ) -> None:
        self.shared = [p for p in shared if p.requires_grad]
        self.task_specific = [p for p in task_specific if p.requires_grad]
        self.representation = list(representation) if representation is not None else None

    def backward(self, losses: Tensor, balancer: Balancer) -> Update:
        """Run ``balancer`` on ``losses`` [T] and accumulate the resulting update into ``.grad``."""
        grads: TaskGradients | None = None
        if balancer.needs is not Needs.LOSSES:
            inputs = self.representation if self.representation is not None else self.shared
            grads = _LazyTaskGradients(losses, inputs)
        update = balancer.balance(losses, grads)
        weighted = (update.weights.detach().to(losses.dtype) * losses).sum()
        if update.extra_loss is not None:
            weighted = weighted + update.extra_loss
        weighted.backward()
        if update.direction is not None:
            raise NotImplementedError("direction updates arrive with the gradient methods")
        return update
