"""Gradient-conflict diagnostics (``diagnostics.every``): pairwise cosines of the tasks' gradients, their norms
and the share of conflicting pairs, every ``every`` steps.

Everything comes from the step's Gramian ``K = G Gᵀ`` of the per-task gradients of the shared parameters
(in ``balancer.mode=representation``: of the shared representation, the gradients that balancer sees):
``‖g_i‖ = √K_ii``, ``cos(g_i, g_j) = K_ij / (‖g_i‖ ‖g_j‖)``, and the conflict share is the fraction of task
pairs whose cosine is negative (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, call such
gradients conflicting). A gradient method forms that Gramian anyway, so it costs nothing more there; for a
loss-weighting method the engine computes the per-task gradients on those steps only.

Per step the values go to ``diagnostics.csv`` in the run folder and to TensorBoard (``diagnostics/...``);
per epoch ``history.csv`` gets their mean over the epoch's diagnostic steps (``diag/cos/A~B``,
``diag/norm/A``, ``diag/conflict_share``); at the end of a run ``plots/`` gets the pairwise-cosine heatmap
over training and the conflict-share curve.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any

from torch import Tensor

from mtlvision.engine.logging import write_history
from mtlvision.engine.probes import ProbeContext, StepProbe

#: the per-step file in the run folder
DIAGNOSTICS_NAME = "diagnostics.csv"


def pair_name(a: str, b: str) -> str:
    """The column name of a task pair."""
    return f"{a}~{b}"


def gradient_statistics(gramian: Tensor, names: list[str]) -> dict[str, float]:
    """Norms, pairwise cosines and the conflict share from a Gramian ``K`` [T, T] of per-task gradients.

    Args:
        gramian: ``G Gᵀ`` of the T task gradients.
        names: the T task names, in the Gramian's order.

    Returns:
        ``{"norm/A": ‖g_A‖, "cos/A~B": cos(g_A, g_B), "conflict_share": share of pairs with cos < 0}``; a pair
        with a zero gradient has a NaN cosine and is left out of the share (which is NaN when no pair is left).
    """
    gram = gramian.detach().double().cpu()
    norms = gram.diagonal().clamp_min(0).sqrt()
    values: dict[str, float] = {f"norm/{n}": float(v) for n, v in zip(names, norms)}
    cosines = []
    for i, j in combinations(range(len(names)), 2):
        denominator = float(norms[i] * norms[j])
        cos = float(gram[i, j]) / denominator if denominator > 0 else math.nan
        values[f"cos/{pair_name(names[i], names[j])}"] = cos
        if math.isfinite(cos):
            cosines.append(cos)
    values["conflict_share"] = sum(c < 0 for c in cosines) / len(cosines) if cosines else math.nan
    return values


class GradientDiagnostics(StepProbe):
    """The diagnostics probe: :func:`gradient_statistics` of every ``every``-th step."""

    record = "gramian"

    def __init__(self, every: int) -> None:
        super().__init__(every)
        self.rows: list[dict[str, float]] = []
        self._epoch_start = 0  # index in rows where this epoch's steps begin

    def observe(self, context: ProbeContext) -> dict[str, float]:
        gramian = context.recorded.gramian / context.grad_scale**2
        values = gradient_statistics(gramian, context.task_names)
        if not all(math.isfinite(values[f"norm/{n}"]) for n in context.task_names):
            return {}  # an overflowed step is skipped by the trainer; it says nothing about conflicts
        self.rows.append({"step": float(context.step), "epoch": float(context.epoch + 1), **values})
        return {f"diagnostics/{key}": value for key, value in values.items()}

    def epoch_end(self) -> dict[str, float]:
        rows, self._epoch_start = self.rows[self._epoch_start :], len(self.rows)
        if not rows:
            return {}
        summary: dict[str, float] = {}
        for key in rows[0]:
            if key in ("step", "epoch"):
                continue
            finite = [row[key] for row in rows if math.isfinite(row[key])]
            summary[f"diag/{key}"] = sum(finite) / len(finite) if finite else math.nan
        summary["diag/steps"] = float(len(rows))
        return summary

    def write(self, run_dir: Path) -> None:
        if self.rows:
            write_history(run_dir / DIAGNOSTICS_NAME, self.rows)

    def plot(self, plots_dir: Path) -> list[Path]:
        from mtlvision.evaluation.decision_plots import plot_diagnostics

        return plot_diagnostics(self.rows, plots_dir) if self.rows else []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows], "epoch_start": self._epoch_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state["rows"]]
        self._epoch_start = int(state["epoch_start"])
