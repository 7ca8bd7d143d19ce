"""A resumable, shardable epoch sampler.

The permutation of an epoch depends only on ``(seed, epoch)``; each rank takes every ``world_size``-th
index (padded by repetition so that every rank takes the same number of steps, as DistributedSampler
does), and ``start`` skips the batches already consumed before a mid-epoch checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


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
