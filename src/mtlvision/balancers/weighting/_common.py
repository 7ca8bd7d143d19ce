"""Shared plumbing of the loss-weighting methods: checkpointed state, learnable per-task parameters, and
the error raised where a method is undefined for the loss values it is given."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from mtlvision.balancers.base import Balancer, ExtraStateMixin
from mtlvision.errors import ConfigError, MtlvisionError


class WeightingError(MtlvisionError):
    """A weighting method is undefined for the losses or gradients of this step (e.g. a zero loss under a
    logarithm); the message names the method, the task and the value."""


class LossWeighting(ExtraStateMixin, Balancer):
    """Base of the loss-weighting methods: the result is a weight per task, applied to the losses by one
    ordinary backward. Most read the losses only; some also read gradients they ask for through ``needs``
    (GradNorm the per-task gradient norms from the Gramian, DB-MTL and ExcessMTL the per-task gradients), and
    those declare so. Every one is defined in representation mode too. Running state named in
    ``_state_names`` (tensors, numbers or None) travels in the state dict through ``get_extra_state``, so
    checkpoints load with ``weights_only=True``."""

    supports_representation: ClassVar[bool] = True


class LearnableTaskParameter(LossWeighting):
    """A loss weighting with one learnable value per task (``self.task_param``), trained by the model's
    optimiser through ``Update.extra_loss``. The parameter is created by :meth:`setup` (the trainer calls it
    before building the optimiser) or by passing ``num_tasks``."""

    initial_value: ClassVar[float] = 0.0

    def __init__(self, num_tasks: int | None = None) -> None:
        super().__init__()
        self.task_param: nn.Parameter | None = None
        if num_tasks is not None:
            self.setup(num_tasks)

    def setup(self, num_tasks: int) -> None:
        if num_tasks < 1:
            raise ConfigError(f"{type(self).__name__}: the number of tasks must be positive, got {num_tasks}")
        if self.task_param is None:
            self.task_param = nn.Parameter(torch.full((num_tasks,), self.initial_value))
        elif self.task_param.numel() != num_tasks:
            raise ConfigError(
                f"{type(self).__name__} was set up for {self.task_param.numel()} tasks but is given {num_tasks}"
            )

    def parameter_for(self, losses: Tensor) -> nn.Parameter:
        if self.task_param is None:
            raise ConfigError(
                f"{type(self).__name__} learns one parameter per task: call balancer.setup(num_tasks) before "
                "building the optimiser (or pass num_tasks=...)"
            )
        if self.task_param.numel() != losses.numel():
            raise ConfigError(
                f"{type(self).__name__} was set up for {self.task_param.numel()} tasks but got {losses.numel()} losses"
            )
        return self.task_param


def checked_losses(balancer: Balancer, losses: Tensor, lower: Tensor | float = 0.0, *, strict: bool = True) -> Tensor:
    """The detached losses minus their lower bound ``lower``, in float64, checked to be finite and positive
    (``strict``) or non-negative. Methods that divide by a loss or take its logarithm are undefined
    otherwise; those that add an ε, as their papers do, accept a loss at its bound (a batch without labels
    for a task gives a zero loss)."""
    values = losses.detach().double() - (lower.double() if isinstance(lower, Tensor) else lower)
    bad = torch.nonzero(~torch.isfinite(values) | ((values <= 0) if strict else (values < 0))).flatten().tolist()
    if bad:
        shown = ", ".join(f"task {t}: {values[t].item():.3g}" for t in bad)
        bound = "above its lower bound" if isinstance(lower, Tensor) or lower else "positive"
        if not strict:
            bound = "at or above its lower bound" if isinstance(lower, Tensor) or lower else "non-negative"
        raise WeightingError(
            f"{type(balancer).__name__} divides by each task's loss (or takes its logarithm) and needs every "
            f"loss to be finite and {bound}; got {shown}"
        )
    return values
