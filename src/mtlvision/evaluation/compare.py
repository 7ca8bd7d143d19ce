"""The report of the path from single-task experts to one multi-task model (``mtlvision compare``).

Each model (merged, trained from the merge, trained from scratch, distilled, ...) is set against the
single-task experts: every metric per task, Δm against the experts (overall and per task, lower is better),
parameter count and inference time of one model vs the T experts run one after another on the same batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from mtlvision.evaluation.delta_m import DeltaM, delta_m


@torch.no_grad()
def time_inference(models: Sequence[nn.Module], images: torch.Tensor, repeats: int, device: torch.device) -> float:
    """Median wall time in milliseconds of running every model in ``models`` on ``images`` (one warm-up pass)."""
    images = images.to(device)
    for model in models:
        model.to(device).eval()

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for model in models:
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000.0

    once()
    return statistics.median(once() for _ in range(max(1, repeats)))


@dataclass
class CompareEntry:
    """One model of the comparison (or the experts taken together)."""

    label: str
    kind: str
    path: str
    metrics: dict[str, dict[str, float]]
    parameters: int
    inference_ms: float


@dataclass
class Comparison:
    """Every run against the experts; ``delta(entry)`` is Δm over the entry's tasks."""

    experts: CompareEntry
    runs: list[CompareEntry]
    directions: dict[str, dict[str, bool]]
    split: str
    baselines: str
    batch_size: int
    device: str
    _deltas: dict[str, DeltaM] = field(default_factory=dict, repr=False)

    def delta(self, entry: CompareEntry) -> DeltaM:
        if entry.path not in self._deltas:
            tasks = [t for t in self.directions if t in entry.metrics]
            self._deltas[entry.path] = delta_m(
                {t: entry.metrics[t] for t in tasks},
                {t: self.experts.metrics[t] for t in tasks},
                {t: self.directions[t] for t in tasks},
            )
        return self._deltas[entry.path]

    @property
    def entries(self) -> list[CompareEntry]:
        return [self.experts, *self.runs]

    # ------------------------------------------------------------------------------------------ rows
    def summary_rows(self) -> list[list[str]]:
        rows = []
        for entry in self.entries:
            delta = self.delta(entry)
            rows.append(
                [
                    entry.label,
                    entry.kind,
                    f"{delta.overall:+.2f}",
                    ", ".join(f"{t} {v:+.1f}" for t, v in delta.per_task.items()),
                    f"{entry.parameters / 1e6:.2f}M",
                    f"{entry.parameters / self.experts.parameters:.2f}×",
                    f"{entry.inference_ms:.1f}",
                    f"{entry.inference_ms / self.experts.inference_ms:.2f}×",
                ]
            )
        return rows

    SUMMARY_COLUMNS = ("model", "what it is", "Δm %", "Δm per task %", "params", "vs experts", "ms/batch", "vs experts")

    def task_rows(self, task: str) -> tuple[list[str], list[list[str]]]:
        metrics = list(self.directions[task])
        header = ["model", "what it is", *(f"{m} {'↑' if self.directions[task][m] else '↓'}" for m in metrics), "Δm %"]
        rows = []
        for entry in self.entries:
            if task in entry.metrics:
                values = [f"{entry.metrics[task][m]:.4f}" for m in metrics]
                rows.append([entry.label, entry.kind, *values, f"{self.delta(entry).per_task[task]:+.2f}"])
        return header, rows

    # --------------------------------------------------------------------------------------- renderings
    def tables(self) -> list[Table]:
        """Rich tables: one per task, then the summary."""
        result = []
        for task in self.directions:
            header, rows = self.task_rows(task)
            table = Table(title=f"{task} ({self.split} split)")
            for column in header:
                table.add_column(column, justify="left" if column in {"model", "what it is"} else "right")
            for row in rows:
                table.add_row(*row)
            result.append(table)
        summary = Table(
            title=f"Δm against the experts of {self.baselines} (lower is better); inference: batch of "
            f"{self.batch_size} on {self.device}, median"
        )
        for column in self.SUMMARY_COLUMNS:
            left = column in {"model", "what it is", "Δm per task %"}
            summary.add_column(column, justify="left" if left else "right")
        for row in self.summary_rows():
            summary.add_row(*row)
        result.append(summary)
        return result

    def markdown(self) -> str:
        """The same tables in Markdown (for a README)."""

        def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            return "\n".join(lines)

        parts = [
            f"Δm against the experts of `{self.baselines}` on the {self.split} split (lower is better); inference "
            f"time: a batch of {self.batch_size} images on {self.device}, median.",
            render(self.SUMMARY_COLUMNS, self.summary_rows()),
        ]
        for task in self.directions:
            parts.append(f"**{task}**")
            parts.append(render(*self.task_rows(task)))
        return "\n\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "baselines": self.baselines,
            "batch_size": self.batch_size,
            "device": self.device,
            "models": [{**vars(entry), "delta_m": self.delta(entry).to_dict()} for entry in self.entries],
        }

    def plot(self, path: Path) -> Path:
        """A PNG: Δm per task and overall, parameters, and inference time of every model."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        entries = self.entries
        labels = [e.label for e in entries]
        fig, axes = plt.subplots(1, 3, figsize=(6 + 2.2 * len(entries), 4.2))
        tasks = list(self.directions)
        width = 0.8 / (len(tasks) + 1)
        for i, task in enumerate([*tasks, "overall"]):
            values = [
                self.delta(e).overall if task == "overall" else self.delta(e).per_task.get(task, float("nan"))
                for e in entries
            ]
            axes[0].bar([x + i * width for x in range(len(entries))], values, width, label=task)
        axes[0].axhline(0, color="black", linewidth=0.8)
        axes[0].set_title("Δm % vs experts (lower is better)")
        axes[0].legend(fontsize=7)
        axes[1].bar(range(len(entries)), [e.parameters / 1e6 for e in entries], color="tab:gray")
        axes[1].set_title("parameters (M)")
        axes[2].bar(range(len(entries)), [e.inference_ms for e in entries], color="tab:green")
        axes[2].set_title(f"inference ms / batch of {self.batch_size}")
        for axis in axes:
            axis.set_xticks([x + (0.4 - width / 2 if axis is axes[0] else 0) for x in range(len(entries))])
            axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
