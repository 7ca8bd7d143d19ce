"""Evaluation over a whole split: metrics accumulated sample by sample, never averages of batch averages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mtlvision.tasks.base import Task


@dataclass
class EvalResult:
    """Per-task metrics and mean per-task losses over a split."""

    metrics: dict[str, dict[str, float]]
    losses: dict[str, float]

    @property
    def total_loss(self) -> float:
        return float(sum(self.losses.values()))


def move_batch(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a collated batch (nested dicts and lists too) to ``device``."""

    def move(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {k: move(v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict],
    tasks: Mapping[str, Task],
    device: torch.device,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Run ``model`` over ``batches`` and accumulate each task's metrics and loss over the whole split.

    A task's loss is averaged over the samples that carry its label (weighted by their count per batch).
    In distributed evaluation each process sees a shard: ``reduce_sum`` sums loss totals over processes,
    and the metrics (torchmetrics) synchronise their states in ``compute``.
    """
    was_training = model.training
    model.eval()
    metrics = {name: task.metric().to(device) for name, task in tasks.items()}
    loss_sums = {name: 0.0 for name in tasks}
    counts = {name: 0 for name in tasks}
    for batch in batches:
        batch = move_batch(batch, device)
        predictions = model(batch["image"])
        for name, task in tasks.items():
            valid = batch["valid"][name]
            n_valid = int(valid.sum())
            if n_valid:
                loss = task.loss(predictions[name], batch["targets"][name], valid)
                loss_sums[name] += float(loss) * n_valid
                counts[name] += n_valid
            metrics[name].update(predictions[name], batch["targets"][name], valid)
    model.train(was_training)
    totals = torch.tensor([[loss_sums[n], counts[n]] for n in tasks], dtype=torch.float64, device=device)
    if reduce_sum is not None:
        totals = reduce_sum(totals)
    return EvalResult(
        metrics={name: {k: float(v) for k, v in metrics[name].compute().items()} for name in tasks},
        losses={name: float(totals[i, 0] / totals[i, 1].clamp_min(1)) for i, name in enumerate(tasks)},
    )
