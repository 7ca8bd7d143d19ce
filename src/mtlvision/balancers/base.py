"""The Balancer contract: per-task losses (and, on request, per-task gradients) in, one update out.

A balancer never reaches into the model or the trainer. The gradient engine
(:mod:`mtlvision.balancers.engine`) hands it the per-task losses and a :class:`TaskGradients` object that
computes, lazily and at most once per step, the per-task gradients of the shared parameters (the Jacobian
``G`` of shape ``[T, P]``), their Gramian ``K = G Gᵀ`` or the per-task gradients of the shared
representation. The balancer answers with an :class:`Update`; the engine turns it into ``.grad`` on every
parameter. Balancers are ``nn.Module`` so that learnable weights (UW, GradNorm) reach the optimizer and
their state (buffers, ``get_extra_state``) travels in checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlvision.errors import CheckpointError, InternalError


class Needs(str, Enum):
    """What a balancer needs beyond the losses."""

    LOSSES = "losses"  # loss weighting: only the loss values
    JACOBIAN = "jacobian"  # the per-task gradient matrix G [T, P]
    GRAMIAN = "gramian"  # only K = G Gᵀ [T, T]; the update is a weighted sum of task gradients


class TaskGradients(ABC):
    """Lazily computed per-task gradients for one training step (each computed at most once)."""

    @property
    @abstractmethod
    def num_tasks(self) -> int: ...

    @abstractmethod
    def jacobian(self) -> Tensor:
        """``G`` [T, P]: row t is the gradient of task t's loss w.r.t. the shared parameters (or the
        shared representation in representation mode), flattened and concatenated."""

    @abstractmethod
    def gramian(self) -> Tensor:
        """``K = G Gᵀ`` [T, T] in float32 (float64 where the engine is asked for it)."""

    @property
    def num_columns(self) -> int:
        """``P``, the number of columns of ``G`` (shared parameters, or representation entries)."""
        return int(self.jacobian().shape[1])

    def jacobian_blocks(self, release: bool = False) -> Iterator[tuple[slice, Tensor]]:
        """``G`` as ``(columns, G[:, columns])`` pairs that cover its columns in order, each block ``[T, n]``.

        For methods that keep per-task state of ``G``'s shape (a moving average, AdaGrad sums): updating it
        block by block, in place, needs no ``[T, P]`` temporary. With ``release=True`` each block is freed
        once the iteration moves past it, and the object answers no further ``jacobian``, ``gramian`` or
        block requests: the balancer must then return ``Update.direction``. This default yields ``G`` whole.
        """
        matrix = self.jacobian()
        yield slice(0, matrix.shape[1]), matrix


def jacobian_shaped_state(current: Tensor | None, shape: tuple[int, int], like: Tensor) -> Tensor:
    """A balancer's per-task state of ``G``'s shape on ``like``'s device, to be updated in place block by
    block (see :meth:`TaskGradients.jacobian_blocks`): zeros of ``like``'s dtype at the first step, else
    ``current`` (restored from a checkpoint, perhaps on another device) moved there."""
    if current is None:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    return current.to(like.device)


def require_grads(balancer: Balancer, grads: TaskGradients | None) -> TaskGradients:
    """``grads``, refusing None: a balancer that needs per-task gradients was called without them."""
    if grads is None:
        raise InternalError(
            f"balancer {type(balancer).__name__} needs per-task gradients ({balancer.needs.value}) but was called "
            "with the losses only; run it through mtlvision.balancers.GradientEngine (a gradient method also "
            "through mtlvision.balancers.aggregate)"
        )
    return grads


@dataclass
class Update:
    """A balancer's answer for one step.

    - ``weights`` [T]: task weights, always recorded and logged. When ``direction`` is None the update
      of every parameter is the gradient of ``Σ_t weights_t · loss_t`` (weights are detached).
    - ``direction`` [P]: the update of the shared parameters (same layout as ``TaskGradients.jacobian``
      rows), for methods whose result is not a weighted sum of task gradients. Task-specific parameters
      then receive the gradient of ``Σ_t weights_t · loss_t``. In representation mode ``direction`` is a
      vector over the representation and is back-propagated into the shared parameters.
    - ``shared_weights`` [T]: for methods whose shared update is a weighted sum of the task gradients with
      other coefficients than the task-specific one (IMTL's hybrid: ``Σ_t α_t s_t g_t`` for the shared
      parameters, ``s_t ∇L_t`` for each head): the shared (or representation) update is then
      ``Σ_t shared_weights_t g_t``. Only after the balancer asked for the per-task gradients.
    - ``extra_loss``: a scalar back-propagated in addition, for the balancer's own learnable parameters
      (e.g. UW's log-variances, GradNorm's weights). It must not depend on model parameters.
    """

    weights: Tensor
    direction: Tensor | None = None
    extra_loss: Tensor | None = None
    shared_weights: Tensor | None = None


class Balancer(nn.Module, ABC):
    """Turns per-task losses into one update. Subclasses cite their paper in the docstring."""

    needs: ClassVar[Needs] = Needs.LOSSES
    #: whether the method is defined on gradients of the shared representation (MGDA-UB style).
    supports_representation: ClassVar[bool] = False
    #: whether ``balancer.mode: auto`` runs it in representation mode (the "-UB" variants).
    prefers_representation: ClassVar[bool] = False

    @abstractmethod
    def balance(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        """``losses`` [T] (with graph); ``grads`` is None for methods that need only losses."""

    def forward(self, losses: Tensor, grads: TaskGradients | None) -> Update:
        return self.balance(losses, grads)

    #: when True the trainer re-evaluates the step's batch after the optimiser step and calls
    #: :meth:`after_step` with those losses (FAMO's update needs L(θ_{t+1}) on the same batch).
    needs_post_step_losses: ClassVar[bool] = False

    def after_step(self, new_losses: Tensor) -> None:
        """Called after the optimiser step with the same batch's new losses (see ``needs_post_step_losses``)."""

    def on_epoch_end(self, mean_losses: Tensor) -> None:
        """Called once per epoch with each task's mean training loss (DWA uses the loss history)."""

    def setup(self, num_tasks: int) -> None:
        """Called once with the number of tasks before the optimiser is built, so that methods with learnable
        per-task parameters (UW, IMTL-L, GradNorm) create them in time to be optimised."""

    def min_tasks(self) -> int:
        """The fewest tasks the method is defined for with its hyper-parameters (Krum needs ``f + 3``)."""
        return 1


class ExtraStateMixin:
    """Keeps a method's running state (whose shapes are known only at the first step) in the state dict.

    Subclasses list their state attribute names in ``_state_names``; values are tensors, numbers or None,
    so that checkpoints load with ``torch.load(..., weights_only=True)``.
    """

    _state_names: ClassVar[tuple[str, ...]] = ()

    def get_extra_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._state_names}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        missing = [name for name in self._state_names if name not in state]
        if missing:
            raise CheckpointError(f"{type(self).__name__} checkpoint state lacks {', '.join(missing)}")
        for name in self._state_names:
            setattr(self, name, state[name])
