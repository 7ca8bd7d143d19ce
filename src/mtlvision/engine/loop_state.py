"""The training loop's own state (what a checkpoint stores besides weights and optimiser), what ``fit``
returns, and how the best epoch is chosen."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mtlvision.engine import distributed as dist
from mtlvision.engine.logging import EpochSummary
from mtlvision.errors import ConfigError, InternalError, MtlvisionError
from mtlvision.evaluation.delta_m import delta_m
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


MEAN_LAST = "mean_last:"
#: ``train.select``: gain over the first epoch's validation metrics, tasks weighted equally (LibMTL's rule)
DELTA_M_FIRST = "delta_m_first"
#: history columns of the eval split's metrics, recorded at the last epochs under ``mean_last:N``
EVAL_PREFIX = "eval"


class Selection:
    """``train.select``: which epoch's weights are kept and which metrics are reported.

    - ``"loss"``: the epoch with the lowest sum of the tasks' mean validation losses;
    - ``"TASK.METRIC"``: the best epoch by that validation metric, in its own direction;
    - ``"delta_m"``: the best epoch by validation Δm against the single-task experts' validation metrics
      (:attr:`baselines`);
    - ``"delta_m_first"``: the best epoch by the validation metrics' gain over the first epoch's own validation
      metrics, each task's metrics averaged first and then the tasks: the rule of LibMTL's Trainer (Lin and
      Zhang, LibMTL, JMLR 2023: ``count_improvement`` against ``base_result``, the first epoch's results);
    - ``"last"``: the last epoch, with or without validation;
    - ``"mean_last:N"``: the last epoch's weights, and as the reported metrics the mean of the eval split's
      metrics over the last ``N`` epochs, the protocol of Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et
      al., NeurIPS 2023) on NYUv2 and Cityscapes (N = 10); needs no validation split.

    :meth:`score` is lower-is-better in every case.
    """

    def __init__(self, select: str, tasks: Mapping[str, Task]) -> None:
        self.metric: tuple[str, str, bool] | None = None
        self.average_last = parse_mean_last(select)
        self.last = not needs_validation(select)
        self.by_delta_m = select == "delta_m"
        self.by_first_epoch = select == DELTA_M_FIRST
        self.directions = {name: dict(task.metric_directions) for name, task in tasks.items()}
        #: the experts' validation metrics that ``delta_m`` scores against (set by the caller)
        self.baselines: Mapping[str, Mapping[str, float]] | None = None
        if select in ("loss", "last", "delta_m", DELTA_M_FIRST) or self.average_last is not None:
            return
        task, _, metric = select.partition(".")
        if task not in tasks or metric not in tasks[task].metric_directions:
            options = ["loss", "last", "delta_m", DELTA_M_FIRST, "mean_last:N"] + [
                f"{t}.{m}" for t, task_ in tasks.items() for m in task_.metric_directions
            ]
            raise ConfigError(f"train.select={select!r} is not known; choose one of: {', '.join(options)}")
        self.metric = (task, metric, tasks[task].metric_directions[metric])

    def tracks_eval_split(self, epoch: int, epochs: int) -> bool:
        """Whether the eval split is evaluated after ``epoch`` (counted from 0) of ``epochs``."""
        return self.average_last is not None and epoch >= epochs - self.average_last

    def score(
        self,
        result: EvalResult | None,
        epoch: int,
        fallback: float = math.inf,
        history: Sequence[Mapping[str, float]] = (),
    ) -> float:
        """The score of ``epoch`` (counted from 1); ``fallback`` (the training loss) without validation;
        ``history`` holds the rows of the epochs before (``delta_m_first`` reads the first one's metrics)."""
        if self.last:
            return -float(epoch)
        if result is None:
            return fallback
        if self.by_delta_m:
            if self.baselines is None:
                raise ConfigError(
                    "train.select=delta_m scores each epoch by validation Δm against single-task experts, and "
                    "none were given: run `mtlvision baseline` first (or set `baselines:`), or choose another "
                    "train.select."
                )
            return delta_m(result.metrics, self.baselines, self.directions).overall
        if self.by_first_epoch:
            first = EpochSummary.metrics_of(history[0]) if history else result.metrics
            try:
                per_task = delta_m(result.metrics, first, self.directions).per_task
            except MtlvisionError as exc:
                raise MtlvisionError(
                    f"train.select={DELTA_M_FIRST} measures each epoch's validation metrics relative to the first "
                    f"epoch's, and cannot here: {exc}. Choose another train.select (e.g. loss or delta_m)."
                ) from None
            return sum(per_task.values()) / len(per_task)
        if self.metric is None:
            return result.total_loss
        task, metric, higher = self.metric
        value = result.metrics[task][metric]
        return -value if higher else value

    def averaged(self, history: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
        """The mean of the eval-split metrics recorded in the last ``N`` rows of ``history`` (``mean_last:N``)."""
        if self.average_last is None:
            raise InternalError("Selection.averaged is for train.select=mean_last:N only")
        rows = list(history)[-self.average_last :]
        prefix = EVAL_PREFIX + "/"
        keys = [k for k in rows[-1] if k.startswith(prefix)] if rows else []
        if not keys or any(k not in row for row in rows for k in keys):
            raise InternalError("the history lacks the eval-split metrics of the last epochs")
        metrics: dict[str, dict[str, float]] = {}
        for key in keys:
            task, metric = key[len(prefix) :].split("/", 1)
            metrics.setdefault(task, {})[metric] = sum(float(row[key]) for row in rows) / len(rows)
        return metrics


def needs_validation(select: str) -> bool:
    """Whether rule ``select`` reads the validation split (``last`` and ``mean_last:N`` do not)."""
    return select != "last" and parse_mean_last(select) is None


def parse_mean_last(select: str) -> int | None:
    """``N`` of ``train.select=mean_last:N``; None for other rules; a :class:`ConfigError` for a bad ``N``."""
    if not select.startswith(MEAN_LAST):
        return None
    count = select[len(MEAN_LAST) :]
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(
            f"train.select={select!r}: N in mean_last:N must be a positive integer (the number of last epochs "
            "whose eval-split metrics are averaged), e.g. mean_last:10."
        )
    return int(count)


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
