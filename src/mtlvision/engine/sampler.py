"""A resumable, shardable epoch sampler, and the DataLoader of one epoch built on it.

The permutation of an epoch depends only on ``(seed, epoch)``; each rank takes every ``world_size``-th
index (padded by repetition so that every rank takes the same number of steps, as DistributedSampler
does), and ``start`` skips the batches already consumed before a mid-epoch checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtlvision.engine import distributed as dist


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one rank, from position ``start`` (in samples of this rank) on."""

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        pad: bool = True,
    ) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.pad = pad

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1 and self.size % self.world_size:
            order += order[: self.world_size - self.size % self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rank_indices()[self.start :])

    def __len__(self) -> int:
        return max(len(self._rank_indices()) - self.start, 0)


def epoch_loader(
    data: Dataset | DataLoader,
    batch_size: int,
    shuffle: bool,
    *,
    seed: int,
    epoch: int = 0,
    start: int = 0,
    num_workers: int = 0,
    collate: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over this rank's shard of ``data`` (returned as is if it already is one).

    The order depends only on (seed, epoch); ``start`` skips the first samples (mid-epoch resume).
    Datasets with ``set_epoch`` (per-sample seeded augmentation) are told the epoch. For training
    (``shuffle``), a dataset with a ``batch_sampler(batch_size, *, seed, epoch, rank, world_size, start)``
    method that returns a sampler of index lists (per-task datasets mixed per step, see
    :mod:`mtlvision.data.sampling`) decides the batches itself; ``start`` is then in batches.
    """
    if isinstance(data, DataLoader):
        return data
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
    make_batches = getattr(data, "batch_sampler", None) if shuffle else None
    batches = (
        make_batches(
            batch_size,
            seed=seed,
            epoch=epoch,
            rank=dist.rank(),
            world_size=dist.world_size(),
            start=start // batch_size,
        )
        if make_batches is not None
        else None
    )
    if batches is not None:
        return DataLoader(
            data, batch_sampler=batches, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory
        )
    sampler = EpochSampler(
        len(data),  # type: ignore[arg-type]  # map-style datasets define __len__
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=dist.rank(),
        world_size=dist.world_size(),
        start=start,
        pad=shuffle,
    )
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=shuffle and len(sampler) > batch_size,
    )
