"""The training loop's own state (what a checkpoint stores besides weights and optimiser), what ``fit``
returns, and how the best epoch is chosen."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mtlvision.engine import distributed as dist
from mtlvision.errors import ConfigError, MtlvisionError
from mtlvision.evaluation.evaluator import EvalResult
from mtlvision.tasks.base import Task


class TrainingInterrupted(MtlvisionError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run can be resumed."""


class NonFiniteLossError(MtlvisionError):
    """Too many steps produced a NaN or infinite loss or gradient."""


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns: the per-epoch history and the best validation epoch."""

    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    best_val: EvalResult | None = None
    stopped_early: bool = False
    skipped_steps: int = 0


@dataclass
class LoopState:
    """Where the loop is: counters, the best epoch so far, and the running sums of an unfinished epoch."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps taken
    epoch_batches: int = 0  # batches consumed in the current (unfinished) epoch
    best_score: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    # running sums of the unfinished epoch (restored on a mid-epoch resume)
    loss_sum: list[float] = field(default_factory=list)
    weight_sum: list[float] = field(default_factory=list)
    epoch_steps: int = 0

    def to_checkpoint(self) -> dict[str, Any]:
        """``{"loop": counters and sums, "history": rows}``, the two entries a checkpoint keeps them in."""
        loop = asdict(self)
        return {"loop": {k: v for k, v in loop.items() if k != "history"}, "history": loop["history"]}

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any]) -> LoopState:
        return cls(**saved["loop"], history=list(saved["history"]))


class Selection:
    """``train.select``: ``"loss"`` (the sum of the tasks' mean validation losses), ``"TASK.METRIC"`` (that
    validation metric in its own direction) or ``"last"`` (the last epoch, with or without validation);
    :meth:`score` is lower-is-better either way."""

    def __init__(self, select: str, tasks: Mapping[str, Task]) -> None:
        self.metric: tuple[str, str, bool] | None = None
        self.last = select == "last"
        if select in ("loss", "last"):
            return
        task, _, metric = select.partition(".")
        if task not in tasks or metric not in tasks[task].metric_directions:
            options = ["loss", "last"] + [f"{t}.{m}" for t, task_ in tasks.items() for m in task_.metric_directions]
            raise ConfigError(f"train.select={select!r} is not known; choose one of: {', '.join(options)}")
        self.metric = (task, metric, tasks[task].metric_directions[metric])

    def score(self, result: EvalResult | None, epoch: int, fallback: float = math.inf) -> float:
        """The score of ``epoch`` (counted from 1); ``fallback`` (the training loss) without validation."""
        if self.last:
            return -float(epoch)
        if result is None:
            return fallback
        if self.metric is None:
            return result.total_loss
        task, metric, higher = self.metric
        value = result.metrics[task][metric]
        return -value if higher else value


class StopRequest:
    """SIGTERM and SIGINT, while :meth:`catching`, ask for a checkpoint at the next step boundary.

    Under torchrun a signal may reach one rank only: every rank calls :meth:`agreed` at each step boundary,
    so that all of them stop at the same step (and none waits in a collective the others never enter).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.rank: int | None = None  # the rank that received it, once agreed under torchrun

    @property
    def name(self) -> str:
        if self.signal is None:
            return ""
        name = signal.Signals(self.signal).name
        return f"{name} (received by rank {self.rank})" if dist.world_size() > 1 else name

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop; every rank must call this at the same step boundary."""
        found = dist.agree_on_stop(self.signal, device)
        if found is not None:
            self.signal, self.rank = found
        return found is not None

    @contextmanager
    def catching(self) -> Iterator[None]:
        def request_stop(signum: int, frame: Any) -> None:
            self.signal = signum

        try:
            previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread: leave signal handling to the caller
            yield
            return
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
