"""Representation mode (MGDA-UB style): ``G`` is over the entries of the shared representation.

Only the heads are differentiated (one ``autograd.grad`` call per task, each through its own head), so no
Jacobian path plays a part: the engine back-propagates the balancer's representation update into the shared
parameters in one ordinary backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtlvision.balancers.jacobian.base import Step, StepGradients


class RepresentationGradients(StepGradients):
    """Per-task gradients of the shared representation (and of the task-specific parameters) of one step."""

    def __init__(self, step: Step) -> None:
        assert step.representation is not None, "representation mode needs the representation"
        super().__init__(step)
        self._rep = list(step.representation)
        self._jacobian: Tensor | None = None

    @property
    def num_columns(self) -> int:
        return sum(r.numel() for r in self._rep)

    @property
    def jacobian_known(self) -> bool:
        return self._jacobian is not None

    def _compute_heads(self) -> None:
        self._heads()

    def jacobian(self) -> Tensor:
        """``[T, R]`` float32: row t is ``∂L_t/∂rep`` flattened over every representation tensor (batch
        included); not reduced, its rows are over this process's samples."""
        if self._jacobian is None:
            self._heads()
            assert self._rep_grads is not None
            self._jacobian = torch.cat([g.reshape(self.num_tasks, -1) for g in self._rep_grads], dim=1).float()
        return self._jacobian

    def gramian(self) -> Tensor:
        """``K = G Gᵀ`` [T, T] in the engine's ``gramian_dtype``, then ``reduce``d (the Gramian of every
        process's representation gradients together is the sum of the per-process Gramians)."""
        if self._gramian is None:
            jac = self.jacobian().to(self._gramian_dtype)
            self._gramian = self._reduce(jac @ jac.T)
        return self._gramian
