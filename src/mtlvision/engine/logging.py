"""Run logging: per-epoch CSV history, TensorBoard scalars, a rich progress bar, and the epoch-end summary."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mtlvision.engine.checkpoint import atomic_write

console = Console(stderr=True)


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """Write the per-epoch history as CSV with the union of all columns, in first-seen order (atomically)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)

    def write(tmp: Path) -> None:
        tmp.write_text(buffer.getvalue(), newline="")

    atomic_write(path, write)


@dataclass
class EpochSummary:
    """What one finished epoch says (the ``on_epoch_end`` event of the trainer, logged by a training run).

    ``metrics`` are this epoch's validation metrics per task (empty without validation), ``best_metrics``
    those of the best epoch so far (``best_epoch``, the kept weights); ``delta_m`` and ``best_delta_m`` are
    Δm % on the validation split against the single-task experts, when they exist.
    """

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float | None
    metrics: dict[str, dict[str, float]]
    best_epoch: int
    best_metrics: dict[str, dict[str, float]]
    is_best: bool
    delta_m: float | None = None
    best_delta_m: float | None = None

    def line(self) -> str:
        """One plain line (what a log file shows)."""
        parts = [f"epoch {self.epoch}/{self.epochs}", f"train loss {self.train_loss:.4f}"]
        if self.val_loss is not None:
            parts.append(f"val loss {self.val_loss:.4f}")
        parts += [f"{t}.{m} {v:.4f}" for t, values in self.metrics.items() for m, v in values.items()]
        if self.delta_m is not None:
            parts.append(f"Δm {self.delta_m:+.2f}%")
        parts.append("best so far" if self.is_best else f"best: epoch {self.best_epoch}")
        return " — ".join(parts[:2]) + (", " + ", ".join(parts[2:]) if parts[2:] else "")

    @staticmethod
    def metrics_of(row: Mapping[str, float], prefix: str = "val") -> dict[str, dict[str, float]]:
        """A history row's ``prefix/task/metric`` columns as ``{task: {metric: value}}``."""
        metrics: dict[str, dict[str, float]] = {}
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == prefix:
                metrics.setdefault(parts[1], {})[parts[2]] = float(value)
        return metrics


def flatten_metrics(prefix: str, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{task: {metric: v}}`` -> ``{"prefix/task/metric": v}``."""
    return {f"{prefix}/{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}


class TensorBoardLog:
    """Scalars to TensorBoard in ``log_dir`` (no-op without one)."""

    def __init__(self, log_dir: Path | None) -> None:
        self._writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(log_dir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class EpochProgress:
    """A progress bar over one epoch's steps showing the running loss and throughput (images/s)."""

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[speed]:.0f} img/s"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total, loss=float("nan"), speed=0.0)
        self._start = time.perf_counter()
        self._images = 0

    def __enter__(self) -> EpochProgress:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def advance(self, loss: float, images: int) -> None:
        self._images += images
        speed = self._images / max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(self._task, advance=1, loss=loss, speed=speed)
