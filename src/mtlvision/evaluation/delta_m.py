"""The multi-task gain Δm against single-task experts.

Δm% = (100 / K) Σ_k (-1)^{h_k} (M_k - B_k) / B_k over the K reported metrics, with h_k = 1 where higher is
better and B_k the single-task expert's value (Maninis et al. 2019; the convention of the Nash-MTL and FAMO
papers): **lower is better**, and a negative Δm means the multi-task model beats its experts on average.
"""

from __future__ import annotations

import math
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
    """One metric's term, in percent: (-1)^h (M - B) / B * 100. Both values must be finite numbers."""
    if not math.isfinite(value) or not math.isfinite(baseline):
        raise MtlvisionError(
            f"Δm needs finite metric values, got {value!r} against the baseline {baseline!r}; a NaN or infinite "
            "metric has no relative change"
        )
    if baseline == 0:
        raise MtlvisionError(
            "a baseline metric is exactly 0, so its relative change is undefined; Δm cannot be computed"
        )
    sign = -1.0 if higher_is_better else 1.0
    return sign * (value - baseline) / abs(baseline) * 100.0


def delta_m(metrics: Metrics, baselines: Metrics, directions: Mapping[str, Mapping[str, bool]]) -> DeltaM:
    """Δm of ``metrics`` against ``baselines`` over every (task, metric) listed in ``directions``.

    Every task in ``metrics`` needs a baseline; a missing one is an error naming it, never a silent skip.
    A metric or baseline value that is missing, not a number, NaN or infinite (a diverged run, a metric
    over an empty split) is refused with an error naming the task and the metric, never averaged into a
    NaN Δm; so is a baseline of exactly 0.
    """
    per_metric: dict[str, dict[str, float]] = {}
    for task, task_directions in directions.items():
        if task not in baselines:
            raise MtlvisionError(f"no single-task baseline for task {task!r}; run `mtlvision baseline` first")
        if task not in metrics:
            raise MtlvisionError(f"no metrics for task {task!r}, so Δm cannot include it")
        per_metric[task] = {}
        for metric, higher in task_directions.items():
            if metric not in baselines[task]:
                raise MtlvisionError(f"the baseline of task {task!r} has no metric {metric!r}")
            if metric not in metrics[task]:
                raise MtlvisionError(f"task {task!r} reports no metric {metric!r}, so Δm cannot include it")
            value = _number(metrics[task][metric], f"task {task!r} metric {metric!r}")
            baseline = _number(baselines[task][metric], f"the baseline of task {task!r} metric {metric!r}")
            try:
                per_metric[task][metric] = relative_change(value, baseline, higher)
            except MtlvisionError as exc:
                raise MtlvisionError(f"task {task!r} metric {metric!r}: {exc}") from None
    terms = [v for task_terms in per_metric.values() for v in task_terms.values()]
    per_task = {t: sum(v.values()) / len(v) for t, v in per_metric.items()}
    return DeltaM(overall=sum(terms) / len(terms), per_task=per_task, per_metric=per_metric)


def _number(value: object, what: str) -> float:
    """``value`` as a finite float, or an error naming ``what``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MtlvisionError(f"{what} is {value!r}, not a number; Δm cannot be computed") from None
    if not math.isfinite(number):
        raise MtlvisionError(
            f"{what} is {number}: Δm is undefined for a non-finite metric (a diverged run, or a metric over "
            "an empty split?); fix or re-evaluate that run before comparing"
        )
    return number
