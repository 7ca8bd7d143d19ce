"""Under torch.distributed, every task's metric over sharded data equals the metric of one process over all.

Two CPU processes (gloo). One rank sees no valid sample at all, as a partially labelled split can do.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mtlvision.tasks import Classification, Depth, MultiLabel, Normals, Segmentation, Task

TASKS = [Classification("c", 4), MultiLabel("m", 3), Segmentation("s", 3), Depth("d"), Normals("n")]


def _batches(task: Task, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in (3, 2, 4):
        if task.level == "image":
            prediction = torch.randn(size, task.output_channels, generator=generator)
        else:
            prediction = torch.randn(size, task.output_channels, 4, 5, generator=generator)
        if isinstance(task, Classification):
            target = torch.randint(0, 4, (size,), generator=generator)
        elif isinstance(task, MultiLabel):
            target = (torch.rand(size, 3, generator=generator) < 0.5).float()
        elif isinstance(task, Segmentation):
            target = torch.randint(0, 3, (size, 4, 5), generator=generator)
        elif isinstance(task, Depth):
            prediction = prediction.abs() + 0.5
            target = torch.rand(size, 1, 4, 5, generator=generator) * 3
        else:
            target = F.normalize(torch.randn(size, 3, 4, 5, generator=generator), dim=1)
        valid = torch.rand(size, generator=generator) < 0.7
        batches.append((prediction, target, valid))
    return batches


def _shard(rank: int, task_index: int) -> list[tuple]:
    batches = _batches(TASKS[task_index], task_index)
    if rank == 1:
        return [(p, t, torch.zeros_like(v)) for p, t, v in batches[:1]]  # rank 1: nothing labelled
    return batches


def _worker(rank: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for index, task in enumerate(TASKS):
            metric = task.metric()
            for batch in _shard(rank, index):
                metric.update(*batch)
            results[(rank, index)] = metric.compute()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_metrics_equal_single_process_metrics(tmp_path: Path) -> None:
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    for index, task in enumerate(TASKS):
        single = task.metric()
        for batch in _shard(0, index):
            single.update(*batch)
        expected = single.compute()
        for rank in (0, 1):
            got = results[(rank, index)]
            assert set(got) == set(expected)
            for key, value in expected.items():
                assert not math.isnan(value)
                assert got[key] == pytest.approx(value, rel=1e-6), (task.kind, rank, key)
