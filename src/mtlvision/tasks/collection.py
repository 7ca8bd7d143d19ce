"""A :class:`~mtlvision.tasks.base.TaskMetric` built from torchmetrics metrics that see only valid samples.

The torchmetrics metrics accumulate their states over the whole split and sum them across processes under
torch.distributed when computed, so the result is the split's metric, never a mean of batch means.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection


class SampleCount(Metric):
    """The number of samples seen (summed across processes); the collection's ``(preds, target)`` signature."""

    full_state_update = False
    count: Tensor  # metric state (add_state)

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.count += target.shape[0]

    def compute(self) -> Tensor:
        return self.count


class ValidSampleMetrics(ABC):
    """Feeds the valid samples of each batch to a :class:`MetricCollection` and reports plain floats.

    Subclasses turn a prediction and its target into the ``(preds, target)`` pair that every metric of the
    collection takes, and turn the collection's results into the task's metrics. When the split holds no
    valid sample at all, every metric is NaN (there is nothing to measure).
    """

    def __init__(self, metrics: Mapping[str, Metric], keys: Iterable[str]) -> None:
        # No compute groups: the grouping happens at a process's first update, so a process without valid
        # samples would group differently and issue different collectives under torch.distributed.
        self.metrics = MetricCollection(dict(metrics), compute_groups=False)
        self.samples = SampleCount()
        self.keys = tuple(keys)

    @abstractmethod
    def prepare(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The collection's ``(preds, target)`` for a batch of valid samples."""

    @abstractmethod
    def summarise(self, values: dict[str, Tensor]) -> dict[str, float]:
        """The task's metrics (exactly ``keys``) from the collection's computed values."""

    def update(self, prediction: Tensor, target: Tensor, valid: Tensor) -> None:
        keep = valid.to(device=target.device, dtype=torch.bool)
        if not bool(keep.any()):  # torchmetrics cannot take an empty batch
            return
        preds, labels = self.prepare(prediction.detach()[keep], target[keep])
        self.samples.update(preds, labels)
        self.metrics.update(preds, labels)

    def compute(self) -> dict[str, float]:
        with warnings.catch_warnings():
            # A split without a valid sample never updates the counter; the NaNs below say so.
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric SampleCount")
            samples = int(self.samples.compute())
        if samples == 0:
            return {key: float("nan") for key in self.keys}
        return self.summarise(self.metrics.compute())

    def reset(self) -> None:
        self.metrics.reset()
        self.samples.reset()

    def to(self, device: torch.device | str) -> ValidSampleMetrics:
        self.metrics.to(device)
        self.samples.to(device)
        return self
