"""A tuning study's plots: optimisation history, Pareto front and parameter importances, as PNG (matplotlib)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_optimisation_history(
    numbers: Sequence[int], values: Sequence[float], name: str, minimize: bool, path: Path
) -> Path:
    """Each finished trial's objective value by trial number, and the best so far as a step line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(numbers, values, s=18, label=name)
    best: list[float] = []
    for value in values:
        best.append(value if not best else (min if minimize else max)(best[-1], value))
    ax.step(numbers, best, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(name + (" (lower is better)" if minimize else " (higher is better)"))
    ax.set_title("optimisation history")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto_front(
    values: Sequence[Sequence[float]], on_front: Sequence[bool], names: Sequence[str], path: Path
) -> Path:
    """Every pair of objectives (up to 15 panels): all trials, the Pareto-optimal ones highlighted."""
    pairs = list(itertools.combinations(range(len(names)), 2))[:15]
    columns = min(3, len(pairs))
    rows = (len(pairs) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs, strict=False):
        rest = [v for v, front in zip(values, on_front, strict=True) if not front]
        best = [v for v, front in zip(values, on_front, strict=True) if front]
        ax.scatter([v[i] for v in rest], [v[j] for v in rest], s=14, color="tab:gray", label="trial")
        ax.scatter([v[i] for v in best], [v[j] for v in best], s=24, color="tab:red", label="Pareto front")
        ax.set_xlabel(names[i])
        ax.set_ylabel(names[j])
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle("Pareto front (lower is better on each axis)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_importances(importances: Mapping[str, float], title: str, path: Path) -> Path:
    """Horizontal bars, the most important parameter on top."""
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(items) + 1.5))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
