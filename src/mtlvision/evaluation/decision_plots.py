"""Figures that help decide what to train: gradient cosines over training, the conflict share, task affinity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def plot_diagnostics(rows: Sequence[dict[str, float]], folder: Path) -> list[Path]:
    """``gradient_cosines.png`` (pairs × diagnostic steps, coloured by cosine) and ``conflict_share.png``.

    Args:
        rows: the per-step rows of ``diagnostics.csv`` (``step``, ``cos/A~B``, ``conflict_share``, ...).
        folder: where the PNGs go (made if missing).

    Returns:
        The files written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    steps = [row["step"] for row in rows]
    pairs = [key for key in rows[0] if key.startswith("cos/")]
    written = []
    if pairs:
        values = np.array([[row.get(pair, np.nan) for row in rows] for pair in pairs], dtype=float)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(steps) + 3), 0.35 * len(pairs) + 1.8))
        image = ax.imshow(values, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(pairs)), [pair[len("cos/") :] for pair in pairs], fontsize=7)
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_xticks(ticks, [str(int(steps[t])) for t in ticks])
        ax.set_xlabel("step")
        ax.set_title("cosine between task gradients (blue: aligned, red: conflicting)")
        fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        written.append(folder / "gradient_cosines.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, [row["conflict_share"] for row in rows], marker=".")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("step")
    ax.set_ylabel("share of pairs with cos < 0")
    ax.set_title("gradient conflicts over training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(folder / "conflict_share.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def plot_affinity(matrix: np.ndarray, names: Sequence[str], path: Path, title: str = "") -> Path:
    """A heatmap of the inter-task affinity ``Z[i, j]`` (row: the task whose step was taken, column: the
    task whose loss changed), each cell annotated, coloured symmetrically around 0 on the scale of the
    off-diagonal entries (a task's step lowers its own loss far more; the grouping does not use the
    diagonal, which is drawn grey)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.asarray(matrix, dtype=float)
    off = ~np.eye(len(names), dtype=bool)
    limit = float(np.nanmax(np.abs(values[off]))) or 1.0
    shown = np.where(off, values, np.nan)
    size = 1.0 + 0.75 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.85")
    image = ax.imshow(shown, cmap=cmap, vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("task j (loss after the lookahead)")
    ax.set_ylabel("task i (lookahead step)")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7)
    ax.set_title(title or "inter-task affinity Z[i→j] (TAG)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
