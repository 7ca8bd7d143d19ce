"""torch.distributed under torchrun: process-group set-up, reductions and rank-0 duties.

We do not wrap the model in ``DistributedDataParallel``: its gradient hooks all-reduce inside every
backward, while gradient balancers take several (batched) backward passes per step. Instead each rank
computes its local update and the trainer averages gradients once per step, which gives the same update
as one process on the combined batch (equal per-rank batch sizes, mean-reduced losses).

Faults: ranks stop together at a step boundary (:func:`agree_on_stop`, so that a signal on one rank never
leaves another waiting in a different collective); every collective gives up after ``train.dist_timeout``
seconds; and inside :func:`peer_guard` a backend failure (a rank died or hung) becomes one :class:`PeerLost`
paragraph instead of a gloo/NCCL traceback. Normalisation running statistics are averaged over ranks after
every step (:func:`average_running_stats`), so every rank validates, and the checkpoint saves, the same
buffers, and a resumed run continues exactly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from mtlvision.errors import MtlvisionError

#: ``train.dist_timeout``'s default: seconds a collective waits for the other ranks before giving up
DEFAULT_TIMEOUT_S = 300.0
_timeout_s = DEFAULT_TIMEOUT_S


class PeerLost(MtlvisionError):
    """Another rank died or stopped answering within ``train.dist_timeout``; this rank cannot go on alone."""


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group started by torchrun (gloo on CPU, nccl on CUDA); returns this rank's device.

    ``timeout_s`` bounds every collective (and the rendezvous): a rank that waits longer for the others
    raises (see :func:`peer_guard`). NCCL's watchdog ends the process itself when it fires.
    """
    global _timeout_s
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    _timeout_s = timeout_s
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
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
    grads: list[Tensor] = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = p.numel()
        g.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_on_stop(signum: int | None, device: torch.device) -> tuple[int, int] | None:
    """Called by every rank at the same step boundary: ``(signal, rank)`` when some rank was asked to stop
    (the largest signal number and the highest rank that received one), else None; every rank gets the same
    answer, so every rank saves and stops at the same step."""
    if not is_distributed():
        return None if signum is None else (signum, 0)
    flag = torch.tensor([signum or 0, rank() if signum else -1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    found, by = (int(v) for v in flag.tolist())
    return (found, by) if found else None


def average_running_stats(module: nn.Module) -> None:
    """Set every normalisation layer's running mean and variance to their mean over ranks (one all-reduce).

    Each rank tracks statistics of its own shard; called after every step, every rank holds the same buffers
    (the running mean is then the one a single process on the combined batch tracks), so sharded validation
    and the checkpoint (saved from rank 0, loaded by every rank) agree.
    """
    if not is_distributed():
        return
    stats = [
        buffer
        for layer in module.modules()
        if isinstance(layer, _NormBase) and layer.track_running_stats
        for buffer in (layer.running_mean, layer.running_var)
        if buffer is not None
    ]
    if not stats:
        return
    flat = torch.cat([b.detach().float().reshape(-1) for b in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for buffer in stats:
        n = buffer.numel()
        buffer.copy_(flat[offset : offset + n].view_as(buffer))
        offset += n


def _backend_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because a peer died or timed out (gloo raises RuntimeError)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    markers = ("gloo", "NCCL", "nccl", "Connection closed", "Connection reset", "Timed out", "timed out")
    return isinstance(exc, RuntimeError) and any(marker in text for marker in markers)


def _lost_message(exc: BaseException, run_dir: Path | None) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0].rstrip(".")  # gloo: "[path/pair.cc:545] Read..."
    if "timed out" in text.lower():
        what = f"another rank did not answer within train.dist_timeout={_timeout_s:g} s (it hangs or is far behind)"
    else:
        what = "another rank's connection closed (that process died)"
    resume = f"`mtlvision train --resume {run_dir}`" if run_dir is not None else "`mtlvision train --resume RUN`"
    return (
        f"rank {rank()} of {world_size()} lost contact with the other ranks: {what} ({detail}). The run cannot "
        f"go on with a rank missing; restart every rank from the last checkpoint with {resume} under the same "
        "torchrun command (train.checkpoint_every shortens what is repeated)."
    )


@contextmanager
def peer_guard(run_dir: Path | None = None) -> Iterator[None]:
    """Turn a collective's failure (a peer died, or hung past ``train.dist_timeout``) into :class:`PeerLost`."""
    try:
        yield
    except RuntimeError as exc:
        if not (dist.is_available() and dist.is_initialized() and _backend_failure(exc)):
            raise
        raise PeerLost(_lost_message(exc, run_dir)) from exc


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
