"""Per-task datasets (multi-input MTL): one dataset per task, mixed into batches by a seeded sampler.

When each task comes with its own images (Office-31: one domain per task; or a config mapping tasks to
different datasets), :class:`MultiSourceDataset` concatenates the sources and marks every sample's targets
for the *other* sources' tasks as missing (``valid`` False, the task's placeholder), so collate, losses and
metrics work unchanged: each task's loss is taken over the samples that carry its label.

:class:`MultiSourceBatchSampler` decides which sources each batch draws from:

- **mixing** ``"mixed"`` (default): every batch holds samples of every source, ``batch_size * p_k`` of source
  ``k`` (largest-remainder rounding, at least one per source while ``batch_size >= K``). Every step then
  gives every task a loss, which gradient balancers (MGDA, PCGrad, ...) need.
  ``"single"``: each batch comes from one source, chosen with probability ``p_k`` (or in turn for
  round-robin), as in loss-only multi-dataset training.
- **strategy** sets ``p``: ``"round_robin"`` uniform; ``"proportional"`` ``p_k = n_k / N``;
  ``"temperature"`` ``p_k ∝ n_k^(1/T)`` (T = 1 proportional, T → ∞ uniform; as in multilingual MTL,
  Arivazhagan et al. 2019).

**Epoch**: ``steps_per_epoch`` when set; otherwise the number of steps after which the largest source has
been drawn ``n_max`` times in expectation, ``ceil(n_max / (batch_size * p_max))`` (for proportional sampling
this is ``ceil(N / batch_size)``). Within a source, samples are drawn without replacement from a seeded
permutation that is reshuffled each time it runs out, so small sources repeat and large ones are walked
through.

**Distributed**: every rank draws the same global batches (the draw depends on ``seed`` and the epoch set by
:meth:`MultiSourceBatchSampler.set_epoch`) of ``batch_size * world_size`` samples with the same per-source
composition, and keeps its own ``batch_size`` slice, so ranks see disjoint samples. ``start`` skips the
batches of the epoch already consumed before a mid-epoch checkpoint (the draw itself is unchanged).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset, Sampler

from mtlvision.errors import ConfigError

Strategy = Literal["round_robin", "proportional", "temperature"]
Mixing = Literal["mixed", "single"]
Placeholder = Callable[[int, int], Any]


class SamplingParams(BaseModel):
    """``data.sampling.*``: how a multi-source dataset's sources are mixed into training batches."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = "proportional"
    mixing: Mixing = "mixed"
    temperature: float = Field(5.0, gt=0, description="strategy temperature: p_k ∝ n_k^(1/T), 5 as Arivazhagan")
    steps_per_epoch: int | None = Field(None, ge=1, description="default: see the module docstring")


class MultiSourceDataset(Dataset):
    """The concatenation of per-task datasets; each sample marks other sources' tasks as missing.

    ``sources`` maps a source name to its dataset; the tasks a source labels are the keys of its samples'
    ``targets`` whose ``valid`` is True. ``placeholders`` maps *every* task to the function
    ``(height, width) -> target`` that fills a missing label (a Task's ``placeholder_target``).
    ``sampling`` sets how :meth:`batch_sampler` mixes the sources for training.
    """

    def __init__(
        self,
        sources: Mapping[str, Dataset],
        placeholders: Mapping[str, Placeholder],
        sampling: SamplingParams | None = None,
    ) -> None:
        if not sources:
            raise ConfigError("A multi-source dataset needs at least one source dataset.")
        self.names = list(sources)
        self.datasets = [sources[name] for name in self.names]
        self.sizes = [len(d) for d in self.datasets]  # type: ignore[arg-type]  # map-style datasets define __len__
        empty = [n for n, s in zip(self.names, self.sizes) if s == 0]
        if empty:
            raise ConfigError(f"Source dataset(s) {empty} of the multi-source dataset are empty.")
        self.offsets = np.cumsum([0, *self.sizes]).tolist()
        self.placeholders = dict(placeholders)
        self.sampling = sampling or SamplingParams()

    def batch_sampler(
        self, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> MultiSourceBatchSampler:
        """The training batches of ``epoch`` for this rank, from batch ``start`` on (the trainer's hook)."""
        sampling = self.sampling
        return MultiSourceBatchSampler(
            self.sizes,
            batch_size,
            strategy=sampling.strategy,
            mixing=sampling.mixing,
            temperature=sampling.temperature,
            steps_per_epoch=sampling.steps_per_epoch,
            seed=seed,
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            start=start,
        )

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index within that source) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, index - self.offsets[source]

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, local = self.locate(index)
        item = self.datasets[source][local]
        height, width = int(item["image"].shape[-2]), int(item["image"].shape[-1])
        targets, valid = dict(item["targets"]), dict(item["valid"])
        for task, placeholder in self.placeholders.items():
            if not valid.get(task, False):
                targets[task] = placeholder(height, width)
                valid[task] = False
        return {**item, "targets": targets, "valid": valid, "id": f"{self.names[source]}:{item['id']}"}

    def sample_source(self, index: int) -> Any:
        """Where sample ``index`` comes from (see :mod:`mtlvision.data.datasets.base`), None when its source
        cannot tell; its id carries the source's name like the loaded sample's."""
        from mtlvision.data.datasets.base import sample_source_of

        source, local = self.locate(index)
        found = sample_source_of(self.datasets[source], local)
        return None if found is None else replace(found, id=f"{self.names[source]}:{found.id}")

    def known_targets(self, index: int) -> dict[str, Any]:
        from mtlvision.data.datasets.base import known_targets_of

        source, local = self.locate(index)
        return known_targets_of(self.datasets[source], local)


class TaskView(Dataset):
    """A dataset restricted to some of its tasks, renamed: ``tasks`` maps our task name to the source's.

    For a config that takes each task from a different dataset (two datasets may both call a task
    ``segmentation``), e.g. ``MultiSourceDataset({"digits": TaskView(mnist, {"digit": "left"}),
    "scenes": TaskView(scenes, {"seg": "segmentation"})}, placeholders)``.
    """

    def __init__(self, dataset: Dataset, tasks: Mapping[str, str]) -> None:
        self.dataset = dataset
        self.tasks = dict(tasks)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # map-style datasets define __len__

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        missing = [theirs for theirs in self.tasks.values() if theirs not in item["targets"]]
        if missing:
            raise ConfigError(f"sample {item['id']} has no task {missing[0]!r}; it provides {sorted(item['targets'])}.")
        return {
            **item,
            "targets": {ours: item["targets"][theirs] for ours, theirs in self.tasks.items()},
            "valid": {ours: bool(item["valid"].get(theirs, False)) for ours, theirs in self.tasks.items()},
        }

    def sample_source(self, index: int) -> Any:
        from mtlvision.data.datasets.base import sample_source_of

        found = sample_source_of(self.dataset, index)
        if found is None:
            return None
        files = {ours: found.label_files[theirs] for ours, theirs in self.tasks.items() if theirs in found.label_files}
        return replace(found, label_files=files)

    def known_targets(self, index: int) -> dict[str, Any]:
        from mtlvision.data.datasets.base import known_targets_of

        known = known_targets_of(self.dataset, index)
        return {ours: known[theirs] for ours, theirs in self.tasks.items() if theirs in known}


def source_weights(sizes: Sequence[int], strategy: Strategy, temperature: float = 1.0) -> np.ndarray:
    """The probability ``p_k`` of drawing from source ``k`` under ``strategy`` (see the module docstring)."""
    n = np.asarray(sizes, dtype=np.float64)
    if strategy == "round_robin":
        weights = np.ones_like(n)
    elif strategy == "proportional":
        weights = n
    elif strategy == "temperature":
        if temperature <= 0:
            raise ConfigError(f"data.sampling.temperature must be positive, got {temperature}.")
        weights = n ** (1.0 / temperature)
    else:
        raise ConfigError(
            f"data.sampling.strategy {strategy!r} is unknown; allowed: round_robin, proportional, temperature."
        )
    return weights / weights.sum()


def batch_composition(batch_size: int, weights: np.ndarray) -> list[int]:
    """Samples per source in a mixed batch: largest-remainder rounding of ``batch_size * p``, at least one
    per source when the batch has room."""
    k = len(weights)
    floor_one = batch_size >= k
    counts = np.floor(batch_size * weights).astype(int)
    if floor_one:
        counts = np.maximum(counts, 1)
    while counts.sum() > batch_size:  # the at-least-one rule can overshoot: take from the largest
        counts[np.argmax(counts)] -= 1
    remainders = batch_size * weights - counts
    for source in np.argsort(-remainders, kind="stable")[: batch_size - counts.sum()]:
        counts[source] += 1
    return counts.tolist()


class _SourceStream:
    """Indices of one source without replacement, reshuffled (seeded) each time it runs out."""

    def __init__(self, size: int, seed: Sequence[int]) -> None:
        self.size = size
        self.seed = list(seed)
        self.cycle = 0
        self.order = self._permutation()
        self.position = 0

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([*self.seed, self.cycle]).permutation(self.size)

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.position == self.size:
                self.cycle += 1
                self.order = self._permutation()
                self.position = 0
            step = min(count - len(out), self.size - self.position)
            out.extend(self.order[self.position : self.position + step].tolist())
            self.position += step
        return out


class MultiSourceBatchSampler(Sampler[list[int]]):
    """Yields batches of global indices into a :class:`MultiSourceDataset` (see the module docstring)."""

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        strategy: Strategy = "proportional",
        mixing: Mixing = "mixed",
        temperature: float = 1.0,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        start: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"train.batch_size must be at least 1, got {batch_size}.")
        if not sizes or min(sizes) < 1:
            raise ConfigError(f"Every source needs at least one sample, got sizes {list(sizes)}.")
        if mixing not in ("mixed", "single"):
            raise ConfigError(f"data.sampling.mixing {mixing!r} is unknown; allowed: mixed, single.")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}.")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ConfigError(f"data.sampling.steps_per_epoch must be at least 1, got {steps_per_epoch}.")
        self.sizes = list(sizes)
        self.offsets = np.cumsum([0, *self.sizes]).tolist()
        self.batch_size = batch_size
        self.strategy = strategy
        self.mixing = mixing
        self.weights = source_weights(self.sizes, strategy, temperature)
        self.composition = batch_composition(batch_size, self.weights) if mixing == "mixed" else None
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.start = start
        largest = int(np.argmax(self.sizes))
        per_step = batch_size * self.weights[largest]
        self.steps = steps_per_epoch or max(1, math.ceil(self.sizes[largest] / per_step))

    def set_epoch(self, epoch: int) -> None:
        """Reseed the draw for ``epoch`` (call it at the start of each epoch, as with DistributedSampler)."""
        self.epoch = epoch
        self.start = 0

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        streams = [_SourceStream(size, (self.seed, self.epoch, k)) for k, size in enumerate(self.sizes)]
        chooser = np.random.default_rng([self.seed, self.epoch, len(self.sizes) + 1])
        ranks = self.world_size
        for step in range(self.steps):
            if self.composition is not None:
                counts = self.composition
            else:
                if self.strategy == "round_robin":
                    source = step % len(self.sizes)
                else:
                    source = int(chooser.choice(len(self.sizes), p=self.weights))
                counts = [self.batch_size if k == source else 0 for k in range(len(self.sizes))]
            batch: list[int] = []
            for k, count in enumerate(counts):
                if count == 0:
                    continue
                drawn = streams[k].take(count * ranks)
                mine = drawn[self.rank * count : (self.rank + 1) * count]
                batch.extend(self.offsets[k] + i for i in mine)
            if step >= self.start:
                yield batch
