"""Published results of the standard benchmarks, as data with their sources, and a run's row beside them.

Each benchmark is named after the preset that reproduces its protocol. Values are in mtlvision's units:
mIoU and pixel accuracy as fractions, depth errors in the dataset's units, angles in degrees, the
``within_*`` shares in percent. Only rows whose every value was checked against the cited source are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mtlvision.errors import MtlvisionError
from mtlvision.evaluation.delta_m import delta_m
from mtlvision.registry import Registry

Metrics = Mapping[str, Mapping[str, float]]

#: the direction (higher is better) of every metric the benchmark tables report
NYUV2_DIRECTIONS = {
    "segmentation": {"miou": True, "pixel_accuracy": True},
    "depth": {"abs_err": False, "rel_err": False},
    "normals": {
        "mean_angle": False,
        "median_angle": False,
        "within_11_25": True,
        "within_22_5": True,
        "within_30": True,
    },
}
CITYSCAPES_DIRECTIONS = {
    "segmentation": {"miou": True, "pixel_accuracy": True},
    "depth": {"abs_err": False, "rel_err": False},
}


@dataclass(frozen=True)
class PublishedRow:
    """One method's published result: per-task metrics and where they are printed."""

    method: str
    metrics: dict[str, dict[str, float]]
    source: str


@dataclass(frozen=True)
class PublishedBenchmark:
    """A benchmark protocol's published rows; ``single_task`` names the row Δm is measured against."""

    name: str
    description: str
    directions: dict[str, dict[str, bool]]
    rows: tuple[PublishedRow, ...]
    single_task: str = "single task"

    def baseline(self) -> PublishedRow:
        return next(row for row in self.rows if row.method == self.single_task)


@dataclass
class ComparedRow:
    """A row of the side-by-side table: its metrics and Δm% against the published single-task row."""

    method: str
    metrics: dict[str, dict[str, float]]
    delta_m: float
    source: str


@dataclass
class PublishedComparison:
    """A run's metrics beside a benchmark's published rows (:func:`compare_published`)."""

    benchmark: str
    description: str
    columns: list[tuple[str, str, bool]]  # (task, metric, higher is better)
    rows: list[ComparedRow] = field(default_factory=list)
    own_delta_m: float | None = None  # the run's Δm against its own single-task experts, when it has one


PUBLISHED: Registry[PublishedBenchmark] = Registry("published benchmark")

_STL_SOURCE = (
    "CAGrad (Liu et al., NeurIPS 2021) single-task SegNet; the Δm base of Nash-MTL's and FAMO's code: "
    "AvivNavon/nash-mtl experiments/nyuv2/utils.py and Cranial-XIX/FAMO experiments/nyuv2/utils.py (BASE)"
)
PUBLISHED.register("nyuv2_segnet_mtan", "NYUv2 13 classes, SegNet-MTAN, mean of the last 10 epochs")(
    PublishedBenchmark(
        name="nyuv2_segnet_mtan",
        description="NYUv2 (13 classes, 288 x 384), SegNet-based networks, test metrics averaged over the last 10 "
        "of 200 epochs (Nash-MTL / FAMO protocol)",
        directions=NYUV2_DIRECTIONS,
        rows=(
            PublishedRow(
                "single task",
                {
                    "segmentation": {"miou": 0.3830, "pixel_accuracy": 0.6376},
                    "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
                    "normals": {
                        "mean_angle": 25.01,
                        "median_angle": 19.21,
                        "within_11_25": 30.14,
                        "within_22_5": 57.20,
                        "within_30": 69.15,
                    },
                },
                _STL_SOURCE,
            ),
        ),
    )
)
PUBLISHED.register("cityscapes_segnet_mtan", "Cityscapes 7 classes, SegNet-MTAN, mean of the last 10 epochs")(
    PublishedBenchmark(
        name="cityscapes_segnet_mtan",
        description="Cityscapes (7 classes, 128 x 256), SegNet-based networks, test metrics averaged over the last "
        "10 of 200 epochs (Nash-MTL / FAMO protocol)",
        directions=CITYSCAPES_DIRECTIONS,
        rows=(
            PublishedRow(
                "single task",
                {
                    "segmentation": {"miou": 0.7401, "pixel_accuracy": 0.9316},
                    "depth": {"abs_err": 0.0125, "rel_err": 27.77},
                },
                "CAGrad (Liu et al., NeurIPS 2021) single-task SegNet; the Δm base of FAMO's code: "
                "Cranial-XIX/FAMO experiments/cityscapes/utils.py (BASE)",
            ),
        ),
    )
)


def compare_published(metrics: Metrics, name: str, label: str = "this run") -> PublishedComparison:
    """``metrics`` (a run's) beside the published rows of benchmark ``name``, each row with its Δm% against the
    published single-task row over the benchmark's metrics (lower is better).

    Raises :class:`MtlvisionError` naming the task or metric the run lacks (a run of other tasks or data).
    """
    benchmark = PUBLISHED.get(name)
    base = benchmark.baseline().metrics
    columns = [(task, metric, higher) for task, ms in benchmark.directions.items() for metric, higher in ms.items()]
    missing = [f"{t}.{m}" for t, m, _ in columns if m not in metrics.get(t, {})]
    if missing:
        raise MtlvisionError(
            f"the run has no {', '.join(missing)}: benchmark {name!r} compares {', '.join(benchmark.directions)} "
            f"({benchmark.description}). Train with the {name} preset (or its tasks) to compare."
        )
    comparison = PublishedComparison(benchmark.name, benchmark.description, columns)
    for row in benchmark.rows:
        overall = delta_m(row.metrics, base, benchmark.directions).overall
        comparison.rows.append(ComparedRow(row.method, row.metrics, overall, row.source))
    ours = {task: {metric: float(metrics[task][metric]) for metric in ms} for task, ms in benchmark.directions.items()}
    comparison.rows.append(ComparedRow(label, ours, delta_m(ours, base, benchmark.directions).overall, "measured"))
    return comparison
