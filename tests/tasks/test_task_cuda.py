"""On a CUDA device (skipped without one): losses and metrics agree with the CPU, under deterministic
algorithms, and losses accept bfloat16 predictions from autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlvision.tasks import Classification, Depth, Edges, MultiLabel, Normals, Segmentation, Task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batch(task: Task, seed: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dense = (size, task.output_channels, 24, 32)
    if isinstance(task, Classification):
        return (
            torch.randn(size, 5, generator=generator),
            torch.randint(0, 5, (size,), generator=generator),
            torch.arange(size) % 3 != 0,
        )
    if isinstance(task, MultiLabel):
        return (
            torch.randn(size, 4, generator=generator),
            (torch.rand(size, 4, generator=generator) < 0.5).float(),
            torch.arange(size) % 3 != 0,
        )
    if isinstance(task, Segmentation):
        target = torch.randint(0, 4, (size, 24, 32), generator=generator)
        target[:, :3] = 255
        return torch.randn(dense, generator=generator), target, torch.arange(size) % 3 != 0
    if isinstance(task, Edges):
        target = (torch.rand(size, 24, 32, generator=generator) < 0.1).long()
        target[:, :3] = 255
        return torch.randn(dense, generator=generator), target, torch.arange(size) % 3 != 0
    if isinstance(task, Depth):
        target = torch.rand(size, 1, 24, 32, generator=generator) * 4
        target[target < 0.5] = 0
        return target + 0.3 * torch.randn(dense, generator=generator), target, torch.arange(size) % 3 != 0
    target = F.normalize(torch.randn(dense, generator=generator), dim=1)
    target[:, :, :2] = 0
    return target + 0.5 * torch.randn(dense, generator=generator), target, torch.arange(size) % 3 != 0


TASKS = [
    Classification("c", 5),
    MultiLabel("m", 4),
    Segmentation("s", 4),
    Depth("d", "berhu"),
    Normals("n"),
    Edges("e", tolerance=0.05),
]


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.kind)
def test_cuda_matches_cpu(task: Task, deterministic: None) -> None:
    cpu_metric, cuda_metric = task.metric(), task.metric().to("cuda")
    for seed in range(3):
        prediction, target, valid = _batch(task, seed)
        prediction = task.postprocess(prediction)
        cuda = [x.cuda() for x in (prediction, target, valid)]
        cpu_loss = task.loss(prediction, target, valid)
        raw = cuda[0].clone().requires_grad_(True)
        cuda_loss = task.loss(task.postprocess(raw), cuda[1], cuda[2])
        cuda_loss.backward()
        assert cuda_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-4)
        assert torch.isfinite(raw.grad).all()
        assert torch.all(raw.grad[~cuda[2]] == 0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = task.loss(cuda[0].bfloat16(), cuda[1], cuda[2])
        assert half.item() == pytest.approx(cpu_loss.item(), rel=0.05, abs=1e-3)
        cpu_metric.update(prediction, target, valid)
        cuda_metric.update(*cuda)
    expected, got = cpu_metric.compute(), cuda_metric.compute()
    assert set(task.metric_directions) <= set(got)  # detection adds per-class AP beside the means
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
