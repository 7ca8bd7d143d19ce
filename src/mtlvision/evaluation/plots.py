"""The run folder's plots: loss curves, validation metric curves and task weights, as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def _columns(history: Sequence[dict[str, float]], prefix: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith(prefix):
                series.setdefault(key[len(prefix) :], []).append((row["epoch"], value))
    return series


#: up to this many epochs every epoch gets a tick; beyond, matplotlib picks whole-number ticks
_TICK_EVERY_EPOCH = 20


def _epoch_axis(ax: plt.Axes, epochs: set[float]) -> None:
    """Whole-number epoch ticks (never 1.25): each epoch's own while there are few, half an epoch of margin."""
    if not epochs:
        return
    if len(epochs) <= _TICK_EVERY_EPOCH:
        ax.set_xticks(sorted(epochs))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)


def _plot(ax: plt.Axes, series: dict[str, list[tuple[float, float]]], title: str, style: str = "-") -> None:
    """One line per series with a marker on each epoch's point (a value per epoch, not a continuous curve)."""
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, style, marker="o", markersize=5, label=label)
    _epoch_axis(ax, {float(x) for points in series.values() for x, _ in points})
    ax.set_title(title)
    ax.set_xlabel("epoch")
    if series:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_history(history: Sequence[dict[str, float]], folder: Path) -> list[Path]:
    """Write ``losses.png``, ``weights.png`` and one ``metrics_<task>.png`` per task into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _plot(axes[0], _columns(history, "train_loss/"), "training loss per task")
    _plot(axes[1], _columns(history, "val_loss/"), "validation loss per task")
    for ax in axes:
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(folder / "losses.png", dpi=100)
    plt.close(fig)
    written.append(folder / "losses.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    _plot(ax, _columns(history, "weight/"), "mean task weight per epoch")
    fig.tight_layout()
    fig.savefig(folder / "weights.png", dpi=100)
    plt.close(fig)
    written.append(folder / "weights.png")

    metrics = _columns(history, "val/")
    for task in sorted({key.split("/")[0] for key in metrics}):
        task_series = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.split("/")[0] == task}
        fig, ax = plt.subplots(figsize=(6, 4))
        _plot(ax, task_series, f"validation metrics: {task}")
        fig.tight_layout()
        path = folder / f"metrics_{task}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
