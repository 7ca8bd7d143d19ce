"""Batching samples of several tasks: each task batches its own targets; validity flags travel along."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import torch
from torch import Tensor

from mtlvision.errors import DataError
from mtlvision.tasks.base import Task


class Batch(TypedDict):
    """A batch: images ``[B, 3, H, W]``, per-task batched targets, per-task validity ``[B]`` and sample ids."""

    image: Tensor
    targets: dict[str, Any]
    valid: dict[str, Tensor]
    ids: list[str]


class Collate:
    """``DataLoader`` collate function for the tasks ``tasks`` (a picklable callable, for worker processes).

    Targets are batched by each task's own :meth:`Task.collate` (variable-length boxes stay a list); a
    sample without a label for a task carries that task's placeholder and ``valid`` False, so the batch
    keeps one row per sample for every task.
    """

    def __init__(self, tasks: Mapping[str, Task]) -> None:
        self.tasks = dict(tasks)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        if not samples:
            raise DataError("cannot collate an empty list of samples.")
        ids = [str(sample["id"]) for sample in samples]
        shapes = {tuple(sample["image"].shape) for sample in samples}
        if len(shapes) > 1:
            listing = ", ".join(f"{i} {tuple(s['image'].shape)}" for i, s in zip(ids, samples, strict=True))
            raise DataError(f"images of one batch differ in size ({listing}); resize them in the transforms.")
        targets: dict[str, Any] = {}
        valid: dict[str, Tensor] = {}
        for name, task in self.tasks.items():
            missing = [i for i, sample in zip(ids, samples, strict=True) if name not in sample["targets"]]
            if missing:
                raise DataError(
                    f"sample {missing[0]} has no target for task {name!r}; datasets store the task's placeholder "
                    "with valid=False for a missing label."
                )
            targets[name] = task.collate([sample["targets"][name] for sample in samples])
            valid[name] = torch.tensor([bool(sample["valid"][name]) for sample in samples], dtype=torch.bool)
        return Batch(image=torch.stack([sample["image"] for sample in samples]), targets=targets, valid=valid, ids=ids)


def collate(samples: Sequence[Mapping[str, Any]], tasks: Mapping[str, Task]) -> Batch:
    """Batch ``samples`` for ``tasks`` (see :class:`Collate`)."""
    return Collate(tasks)(samples)
