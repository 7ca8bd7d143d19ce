"""The Trainer's meta-step for bilevel balancers (Auto-Lambda, MOML, FORUM): one validation batch per optimiser
step, and the model's per-task losses as functions of its parameters (a :class:`BilevelProblem`).

Validation batches are drawn in a shuffled order that depends only on the seed and the optimiser step, so
that a resumed run sees the same ones. The model is evaluated with ``torch.func.functional_call`` on copies
of its buffers: the meta-step changes neither its parameters nor its BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mtlvision.balancers.bilevel import BilevelBalancer, BilevelProblem
from mtlvision.engine import distributed as dist
from mtlvision.errors import ConfigError, InternalError
from mtlvision.evaluation.evaluator import move_batch

if TYPE_CHECKING:
    from mtlvision.engine.trainer import Trainer


class MetaStep:
    """Runs ``trainer.balancer.meta_step`` before each optimiser step, on a batch of ``val_data`` (with
    ``train.accumulate > 1``, against the first of the step's training batches)."""

    def __init__(self, trainer: Trainer, val_data: Dataset | DataLoader | None) -> None:
        if not isinstance(trainer.balancer, BilevelBalancer):
            raise InternalError(f"MetaStep needs a bilevel balancer, got {type(trainer.balancer).__name__}")
        self.balancer: BilevelBalancer = trainer.balancer
        name = type(trainer.balancer).__name__
        if val_data is None:
            raise ConfigError(
                f"balancer {name} is a bilevel method: it learns the task weights on validation batches, and this "
                "run has no validation split (give fit() val_data, or set data.val_size > 0)"
            )
        if trainer.auxiliary is not None:
            raise ConfigError(f"balancer {name} is a bilevel method, which does not take an auxiliary loss")
        self.trainer = trainer
        self.data = val_data
        # counted as they are drawn: shuffled, so an incomplete last batch is dropped (10 samples, batch 4: 2)
        self.batches = len(trainer.loader(val_data, shuffle=True))
        if self.batches == 0:
            raise ConfigError(f"balancer {name} learns from validation batches, but the validation split is empty")
        self._position: tuple[int, int] | None = None
        self._parameters: list[Tensor] = []
        self._iterator: Iterator[dict[str, Any]] | None = None

    def validation_batch(self) -> dict[str, Any]:
        """The validation batch of this optimiser step (pass ``step // batches``, batch ``step % batches``)."""
        trainer = self.trainer
        position = divmod(trainer.state.step, self.batches)
        if self._position != position or self._iterator is None:
            epoch, index = position
            loader = trainer.loader(self.data, shuffle=True, epoch=epoch, start=index * trainer.batch_size)
            self._iterator = iter(loader)
        self._position = (position[0], position[1] + 1)
        return move_batch(next(self._iterator), trainer.device)

    def losses_at(self, batch: dict[str, Any]) -> Callable[[list[Tensor]], Tensor]:
        """The [T] task losses of ``batch`` as a function of the model's trainable parameters."""
        trainer, model = self.trainer, self.trainer.model
        names = [n for n, p in model.named_parameters() if p.requires_grad]

        def losses(params: list[Tensor]) -> Tensor:
            tensors = {**{n: b.clone() for n, b in model.named_buffers()}, **dict(zip(names, params))}
            with trainer.precision.autocast():
                predictions = torch.func.functional_call(model, tensors, (batch["image"],), strict=False)
                return trainer.task_losses(predictions, batch)

        return losses

    def __call__(self, batch: dict[str, Any]) -> None:
        trainer = self.trainer
        self._parameters = [p for p in trainer.model.parameters() if p.requires_grad]
        problem = BilevelProblem(
            parameters=self._parameters,
            train_losses=self.losses_at(batch),
            val_losses=self.losses_at(self.validation_batch()),
            lr=float(trainer.optimizer.param_groups[0]["lr"]),
            reduce=dist.all_reduce_mean,
            epoch=trainer.state.epoch,
        )
        self.balancer.meta_step(problem)

    def add_gradient(self, factor: float) -> None:
        """Add the meta-step's own part of the update (FORUM's), times ``factor`` (the loss scale under fp16),
        to the ``.grad`` that the training step accumulated."""
        extra = self.balancer.take_gradient()
        if extra is None:
            return
        sizes = [p.numel() for p in self._parameters]
        for p, g in zip(self._parameters, extra.split(sizes)):
            g = factor * g.view_as(p).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
