"""The multi-task gain Δm against single-task experts.

Δm% = (100 / K) Σ_k (-1)^{h_k} (M_k - B_k) / B_k over the K reported metrics, with h_k = 1 where higher is
better and B_k the single-task expert's value (Maninis et al. 2019; the convention of the Nash-MTL and FAMO
papers): **lower is better**, and a negative Δm means the multi-task model beats its experts on average.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mtlvision.errors import MtlvisionError

Metrics = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class DeltaM:
    """Δm overall and per task, with the metrics that entered it."""

    overall: float
    per_task: dict[str, float]
    per_metric: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"overall": self.overall, "per_task": self.per_task, "per_metric": self.per_metric}


def relative_change(value: float, baseline: float, higher_is_better: bool) -> float:
    """One metric's term, in percent: (-1)^h (M - B) / B * 100."""
    if baseline == 0:
        raise MtlvisionError(
            "a baseline metric is exactly 0, so its relative change is undefined; Δm cannot be computed"
        )
    sign = -1.0 if higher_is_better else 1.0
    return sign * (value - baseline) / abs(baseline) * 100.0


def delta_m(
    metrics: Metrics, baselines: Metrics, directions: Mapping[str, Mapping[str, bool]]
) -> DeltaM:
    """Δm of ``metrics`` against ``baselines`` over every (task, metric) listed in ``directions``.

    Every task in ``metrics`` needs a baseline; a missing one is an error naming it, never a silent skip.
    """
    per_metric: dict[str, dict[str, float]] = {}
    for task, task_directions in directions.items():
        if task not in baselines:
            raise MtlvisionError(f"no single-task baseline for task {task!r}; run `mtlvision baseline` first")
        per_metric[task] = {}
        for metric, higher in task_directions.items():
            if metric not in baselines[task]:
                raise MtlvisionError(f"the baseline of task {task!r} has no metric {metric!r}")
            per_metric[task][metric] = relative_change(
                float(metrics[task][metric]), float(baselines[task][metric]), higher
            )
    terms = [v for task_terms in per_metric.values() for v in task_terms.values()]
    per_task = {t: sum(v.values()) / len(v) for t, v in per_metric.items()}
    return DeltaM(overall=sum(terms) / len(terms), per_task=per_task, per_metric=per_metric)
