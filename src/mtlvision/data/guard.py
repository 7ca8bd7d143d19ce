"""Bad samples as training reads them: refused with the file named (:class:`CheckedSamples`), or skipped and
counted with ``data.skip_bad`` (:class:`SkipBadSamples`); :func:`guard_split` stacks them for a split.

A sample is bad when reading it raises :class:`DataError` (missing, corrupt or oversized file, a path leading
outside the dataset) or when :func:`~mtlvision.data.problems.sample_problems` finds a problem (a label out of
range, a mask or depth map of another size than its image, a box outside it, ...): the same judgement as
``mtlvision data check``, so that the samples skipped are exactly those the report calls bad. A bad sample
never reaches collate (no "stack expects each tensor to be equal size") nor the augmentation (a mask of the
wrong size is never resized to fit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from mtlvision.data.datasets.base import sample_source_of
from mtlvision.data.problems import sample_problems
from mtlvision.errors import DataError
from mtlvision.tasks.base import Task

HINT = (
    "`mtlvision data check CONFIG` lists every bad sample of the data; data.skip_bad=true skips and counts "
    "them instead of stopping (the same samples)."
)
"""Appended to the error that stops a run at a bad sample."""


def _with_message(error: DataError, message: str) -> DataError:
    """``error``'s class (its ``kind`` tells the checks what went wrong) with ``message``."""
    try:
        return type(error)(message)
    except TypeError:
        return DataError(message)


class CheckedSamples(Dataset):
    """Each sample passes :func:`~mtlvision.data.problems.sample_problems` as it is read; a bad one raises
    DataError naming the file, the task and the split, followed by :data:`HINT` when ``hint``.

    ``tasks`` maps the task names to check to their tasks; targets of other tasks pass unchecked.
    """

    def __init__(self, dataset: Dataset, tasks: Mapping[str, Task], split: str, hint: bool = True) -> None:
        self.dataset = dataset
        self.tasks = dict(tasks)
        self.split = split
        self.hint = hint

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # map-style datasets define __len__

    def _tail(self, sample: str) -> str:
        return f" ({self.split} sample {sample})" + (f" {HINT}" if self.hint else "")

    def __getitem__(self, index: int) -> Any:
        try:
            item = self.dataset[index]
        except DataError as error:
            try:
                source = sample_source_of(self.dataset, index)
            except DataError:
                source = None
            sample = source.id if source is not None else f"#{index}"
            raise _with_message(error, f"{error}{self._tail(sample)}") from None
        problems = sample_problems(item, self.tasks, self.split)
        if problems:
            # the label file is looked up only now: naming it costs a few stat calls, paid for bad samples only
            source = sample_source_of(self.dataset, index)
            if source is not None and source.label_files:
                problems = sample_problems(item, self.tasks, self.split, source)
            kind, _, message = problems[0]
            more = f" ({len(problems) - 1} more problem(s) in this sample)" if len(problems) > 1 else ""
            raise DataError(f"{message} [{kind}]{more}{self._tail(str(item.get('id', index)))}")
        return item


class SkipBadSamples(Dataset):
    """``data.skip_bad``: replace unreadable samples by the next readable one and count them.

    Skipping is deterministic (index + 1, + 2, ... modulo the length), so a run is reproducible. The bad
    indices live in a shared-memory tensor, so :attr:`skipped` is exact across DataLoader worker processes
    (including those started with fork or spawn).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.bad = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()  # type: ignore[arg-type]  # map-style datasets define __len__
        self.messages: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.bad)

    def __getitem__(self, index: int) -> Any:
        size = len(self.bad)
        for step in range(size):
            candidate = (index + step) % size
            if self.bad[candidate]:
                continue
            try:
                return self.dataset[candidate]
            except DataError as error:
                self.bad[candidate] = True
                self.messages[candidate] = str(error)
        raise DataError(
            f"every one of the {size} samples failed to load; the last error: "
            f"{next(reversed(self.messages.values()), 'none recorded')}"
        )

    @property
    def skipped(self) -> int:
        """How many distinct samples were found unreadable so far."""
        return int(self.bad.sum())


def guard_split(dataset: Dataset, tasks: Mapping[str, Task], split: str, skip_bad: bool) -> Dataset:
    """``dataset`` with every sample checked as it is read; bad ones skipped and counted when ``skip_bad``,
    else stopping the run with the file named and :data:`HINT`."""
    checked = CheckedSamples(dataset, tasks, split, hint=not skip_bad)
    return SkipBadSamples(checked) if skip_bad else checked
