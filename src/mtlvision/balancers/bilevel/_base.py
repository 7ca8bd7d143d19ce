"""The bilevel contract: task weights learnt by a meta-step on a validation batch, before each training step.

A bilevel method (Auto-Lambda, MOML) treats the task weights as upper-level variables: it takes a virtual
step of the model on the training losses, measures the validation losses after it, and moves the weights
along the (approximate) gradient of those validation losses. It still knows no model: the trainer hands it
a :class:`BilevelProblem`, i.e. the model's trainable parameters and two functions that evaluate the
per-task training and validation losses at any values of them (the model's buffers, BatchNorm running
statistics included, are left untouched). The weights are ``softmax(ξ)`` of logits ``ξ`` that start at 0
(uniform weights ``1/T``) and move with Adam (LibMTL's ``TW`` module and ``outer_lr``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlvision.balancers.base import TaskGradients, Update
from mtlvision.balancers.weighting._common import LossWeighting
from mtlvision.errors import ConfigError, InternalError


@dataclass
class BilevelProblem:
    """One meta-step's view of the model, built by the trainer from a training and a validation batch.

    - ``parameters``: the model's trainable parameters ``θ`` (the live tensors; a method never changes them).
    - ``train_losses(params)`` / ``val_losses(params)``: the [T] per-task losses of the step's training batch /
      of a validation batch with the parameters replaced by ``params`` (same order and shapes as
      ``parameters``), differentiable with respect to them.
    - ``lr``: the optimiser's current learning rate (the virtual step's, when the method uses it).
    - ``reduce``: averages a meta-gradient over ranks under torch.distributed (identity otherwise), so that
      every rank keeps the same weights.
    - ``epoch``: the number of completed epochs (FORUM's running average decays with it).
    """

    parameters: list[Tensor]
    train_losses: Callable[[list[Tensor]], Tensor]
    val_losses: Callable[[list[Tensor]], Tensor]
    lr: float
    reduce: Callable[[Tensor], Tensor] = lambda tensor: tensor
    epoch: int = 0


def gradients(loss: Tensor, parameters: list[Tensor], retain_graph: bool = False) -> list[Tensor]:
    """``∂loss/∂p`` for every ``p`` (zeros where ``loss`` does not depend on it), detached."""
    grads = torch.autograd.grad(loss, parameters, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(parameters, grads)]


def flat(tensors: list[Tensor]) -> Tensor:
    """The tensors flattened and concatenated into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def moved(parameters: list[Tensor], direction: list[Tensor] | Tensor, step: float) -> list[Tensor]:
    """``θ + step · direction`` as fresh leaf tensors that require grad (``direction`` per parameter, or one
    flat vector in :func:`flat`'s layout); the model's parameters are not touched."""
    if isinstance(direction, Tensor):
        sizes = [p.numel() for p in parameters]
        direction = [d.view_as(p) for d, p in zip(direction.split(sizes), parameters)]
    return [(p.detach() + step * d.to(p.dtype)).requires_grad_(True) for p, d in zip(parameters, direction)]


class BilevelBalancer(LossWeighting):
    """Base of the bilevel methods: softmax task weights whose logits take one Adam step (lr ``outer_lr``)
    along :meth:`meta_gradient` before each training step; the step itself weights the training losses with
    the new weights. The logits and Adam's state travel in checkpoints."""

    #: the trainer calls :meth:`meta_step` with a validation batch before every optimiser step
    needs_validation_batch: ClassVar[bool] = True
    _state_names: ClassVar[tuple[str, ...]] = ("logits", "optimizer_state")

    def __init__(self, outer_lr: float = 1e-3) -> None:
        super().__init__()
        if not outer_lr > 0:
            raise ConfigError(f"balancer.outer_lr must be > 0, got {outer_lr}")
        self.outer_lr = float(outer_lr)
        self.logits: Tensor | None = None
        self.optimizer_state: dict[str, Any] | None = None
        self._optimizer: torch.optim.Adam | None = None

    def setup(self, num_tasks: int) -> None:
        if self.logits is None:
            self.logits = torch.zeros(num_tasks, dtype=torch.float64)
        elif self.logits.numel() != num_tasks:
            raise ConfigError(f"{type(self).__name__} has weights for {self.logits.numel()} tasks, not {num_tasks}")

    def task_weights(self) -> Tensor:
        """The current weights ``softmax(ξ)`` [T] (float64, on the CPU)."""
        if self.logits is None:
            raise InternalError(f"{type(self).__name__} was used before setup(num_tasks)")
        return torch.softmax(self.logits, dim=0)

    def softmax_jacobian(self) -> Tensor:
        """``∂softmax(ξ)/∂ξ = diag(s) − s sᵀ`` [T, T]."""
        s = self.task_weights()
        return torch.diag(s) - torch.outer(s, s)

    @abstractmethod
    def meta_gradient(self, problem: BilevelProblem) -> Tensor:
        """The gradient [T] with which the logits ``ξ`` move (float64, on the CPU)."""

    def meta_step(self, problem: BilevelProblem) -> None:
        """One Adam step of the logits along :meth:`meta_gradient`."""
        if self.logits is None:
            raise InternalError(f"{type(self).__name__}.meta_step was called before setup(num_tasks)")
        grad = problem.reduce(self.meta_gradient(problem).to(torch.float64)).cpu()
        if not torch.isfinite(grad).all():
            raise ConfigError(f"{type(self).__name__}: the meta-gradient of the task weights is not finite: {grad}")
        optimizer = self._adam()
        self.logits.grad = grad
        optimizer.step()
        self.logits.grad = None
        self.optimizer_state = optimizer.state_dict()

    def take_gradient(self) -> Tensor | None:
        """A flat [P] gradient (:func:`flat`'s layout over ``problem.parameters``) that the last meta-step
        adds to the training step's, handed out once; None (the default) when the step is the weighted
        training losses' gradient alone."""
        return None

    def _adam(self) -> torch.optim.Adam:
        assert self.logits is not None
        if self._optimizer is None or self._optimizer.param_groups[0]["params"][0] is not self.logits:
            self._optimizer = torch.optim.Adam([self.logits], lr=self.outer_lr)
            if self.optimizer_state is not None:
                self._optimizer.load_state_dict(self.optimizer_state)
        return self._optimizer

    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        weights = self.task_weights()
        if weights.numel() != losses.numel():
            raise ConfigError(f"{type(self).__name__} has weights for {weights.numel()} tasks but got {losses.numel()}")
        return Update(weights=weights.to(device=losses.device, dtype=losses.dtype))
