"""torch.distributed under torchrun: process-group set-up, reductions and rank-0 duties.

We do not wrap the model in ``DistributedDataParallel``: its gradient hooks all-reduce inside every
backward, while gradient balancers take several (batched) backward passes per step. Instead each rank
computes its local update and the trainer averages gradients once per step, which gives the same update
as one process on the combined batch (equal per-rank batch sizes, mean-reduced losses).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group started by torchrun (gloo on CPU, nccl on CUDA); returns this rank's device."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over ranks (returns ``tensor`` itself when not distributed)."""
    if not is_distributed():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / world_size()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    if not is_distributed():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def global_valued(local: Tensor) -> Tensor:
    """``local`` losses whose values are the mean over ranks while their gradients stay local.

    Loss-weighting balancers compute weights from loss values: every rank then computes the same weights
    (so stateful balancers stay in sync), and averaging gradients afterwards differentiates the global mean.
    """
    if not is_distributed():
        return local
    return local + (all_reduce_mean(local) - local).detach()


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce (parameters without a gradient count as 0)."""
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
