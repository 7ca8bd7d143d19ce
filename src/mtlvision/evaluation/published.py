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
    single_task: str | None = "single task"

    def baseline(self) -> PublishedRow | None:
        """The published single-task row Δm is measured against; None where the source publishes none."""
        return next((row for row in self.rows if row.method == self.single_task), None)


def nyuv2_row(method: str, printed: tuple[float, ...], source: str) -> PublishedRow:
    """A NYUv2 row from its nine values as papers print them (mIoU and pixel accuracy in percent; depth errors;
    mean and median angle in degrees; the three within-shares in percent)."""
    miou, pixel, abs_err, rel_err, mean, median, w11, w22, w30 = printed
    return PublishedRow(
        method,
        {
            "segmentation": {"miou": round(miou / 100, 6), "pixel_accuracy": round(pixel / 100, 6)},
            "depth": {"abs_err": abs_err, "rel_err": rel_err},
            "normals": {
                "mean_angle": mean,
                "median_angle": median,
                "within_11_25": w11,
                "within_22_5": w22,
                "within_30": w30,
            },
        },
        source,
    )


#: LibMTL's table of published SegNet-MTAN rows (each from the papers it names), the source read for them
_LIBMTL_SEGNET = (
    "as published in {papers} and tabulated in LibMTL's examples/nyu/results/segnet_results.pdf, Table 2 "
    "(median-research-group/LibMTL@4336804, the 'reported' line of each method)"
)
_NASH_CAGRAD_ALIGNED = (
    "CAGrad (Liu et al., NeurIPS 2021), Nash-MTL (Navon et al., ICML 2022, Table 2) and Aligned-MTL (Senushkin et al., "
    "CVPR 2023)"
)
_NASH_ALIGNED = "Nash-MTL (Navon et al., ICML 2022, Table 2) and Aligned-MTL (Senushkin et al., CVPR 2023)"
#: (method, the nine printed values, the papers LibMTL names as reporting them)
_SEGNET_ROWS = (
    ("equal weights", (39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08), _NASH_CAGRAD_ALIGNED),
    ("DWA", (39.11, 65.31, 0.5510, 0.2285, 27.61, 23.18, 24.17, 50.18, 62.39), _NASH_ALIGNED),
    ("uncertainty weighting", (36.87, 63.17, 0.5446, 0.2260, 27.04, 22.61, 23.54, 49.05, 63.65), _NASH_ALIGNED),
    ("MGDA", (30.47, 59.90, 0.6070, 0.2555, 24.88, 19.45, 29.18, 56.88, 69.36), _NASH_CAGRAD_ALIGNED),
    ("PCGrad", (38.06, 64.64, 0.5550, 0.2325, 27.41, 22.80, 23.86, 49.83, 63.14), _NASH_CAGRAD_ALIGNED),
    ("GradDrop", (39.39, 65.12, 0.5455, 0.2279, 27.48, 22.96, 23.38, 49.44, 62.87), _NASH_CAGRAD_ALIGNED),
    ("CAGrad", (39.79, 65.49, 0.5486, 0.2250, 26.31, 21.58, 25.61, 52.36, 65.58), _NASH_CAGRAD_ALIGNED),
    ("RLW", (37.17, 63.77, 0.5759, 0.2410, 28.27, 24.18, 22.26, 47.05, 60.62), _NASH_ALIGNED),
    ("Nash-MTL", (40.13, 65.93, 0.5261, 0.2171, 25.26, 20.08, 28.40, 55.47, 68.15), _NASH_ALIGNED),
)
#: LibMTL's ResNet-50 (dilated) + DeepLabV3 heads, hard parameter sharing, one run each (seed 0)
_LIBMTL_RESNET = (
    "LibMTL's examples/nyu/results/resnet_results.pdf, Table 2 (HPS architecture; one run, seed 0; "
    "median-research-group/LibMTL@4336804)"
)
_RESNET_ROWS = (
    ("equal weights", (54.10, 75.78, 0.3771, 0.1596, 23.53, 17.20, 34.55, 60.75, 72.06)),
    ("GradNorm", (53.57, 75.21, 0.3853, 0.1623, 23.32, 16.62, 35.81, 61.85, 72.73)),
    ("uncertainty weighting", (54.02, 75.66, 0.3838, 0.1573, 23.45, 16.86, 35.43, 61.32, 72.33)),
    ("MGDA", (50.15, 73.44, 0.3839, 0.1563, 22.78, 16.05, 37.04, 63.07, 73.65)),
    ("DWA", (53.55, 75.42, 0.3811, 0.1589, 23.63, 17.15, 34.78, 60.71, 71.87)),
    ("GLS", (54.46, 76.01, 0.3793, 0.1566, 22.73, 16.16, 36.76, 62.94, 73.68)),
    ("PCGrad", (54.03, 75.66, 0.3814, 0.1570, 23.62, 17.01, 35.10, 60.96, 71.97)),
    ("GradDrop", (53.90, 75.62, 0.3851, 0.1580, 23.67, 17.04, 34.99, 60.88, 71.91)),
    ("IMTL", (53.53, 75.46, 0.3842, 0.1578, 22.99, 16.44, 36.16, 62.28, 73.20)),
    ("GradVac", (53.99, 75.74, 0.3842, 0.1602, 23.51, 16.93, 35.26, 61.14, 72.17)),
    ("CAGrad", (53.77, 75.80, 0.3836, 0.1584, 22.53, 15.86, 37.40, 63.58, 74.20)),
    ("Nash-MTL", (53.38, 75.01, 0.3814, 0.1570, 22.61, 15.87, 37.30, 63.68, 74.28)),
    ("RLW", (54.52, 75.78, 0.3890, 0.1566, 23.34, 16.83, 35.45, 61.43, 72.45)),
)


@dataclass
class ComparedRow:
    """A row of the side-by-side table: its metrics and Δm% against the published single-task row (None where
    the benchmark's source publishes no single-task row)."""

    method: str
    metrics: dict[str, dict[str, float]]
    delta_m: float | None
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
            nyuv2_row("single task", (38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15), _STL_SOURCE),
            *(nyuv2_row(m, v, _LIBMTL_SEGNET.format(papers=papers)) for m, v, papers in _SEGNET_ROWS),
        ),
    )
)
PUBLISHED.register("nyuv2_resnet50", "NYUv2 13 classes, LibMTL's ResNet-50 (dilated) + DeepLabV3 heads, HPS")(
    PublishedBenchmark(
        name="nyuv2_resnet50",
        description="NYUv2 (13 classes, 288 x 384), ResNet-50 (dilated, ImageNet start) with a DeepLabV3 head per "
        "task, hard parameter sharing, 200 epochs, LibMTL's best epoch (LibMTL protocol); the source publishes no "
        "single-task row, so Δm is against the run's own experts only",
        directions=NYUV2_DIRECTIONS,
        rows=tuple(nyuv2_row(m, v, _LIBMTL_RESNET) for m, v in _RESNET_ROWS),
        single_task=None,
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
    published single-task row over the benchmark's metrics (lower is better; None without such a row).

    Raises :class:`MtlvisionError` naming the task or metric the run lacks (a run of other tasks or data).
    """
    benchmark = PUBLISHED.get(name)
    baseline = benchmark.baseline()
    columns = [(task, metric, higher) for task, ms in benchmark.directions.items() for metric, higher in ms.items()]
    missing = [f"{t}.{m}" for t, m, _ in columns if m not in metrics.get(t, {})]
    if missing:
        raise MtlvisionError(
            f"the run has no {', '.join(missing)}: benchmark {name!r} compares {', '.join(benchmark.directions)} "
            f"({benchmark.description}). Train with the {name} preset (or its tasks) to compare."
        )
    comparison = PublishedComparison(benchmark.name, benchmark.description, columns)

    def against_baseline(values: Metrics) -> float | None:
        return None if baseline is None else delta_m(values, baseline.metrics, benchmark.directions).overall

    for row in benchmark.rows:
        comparison.rows.append(ComparedRow(row.method, row.metrics, against_baseline(row.metrics), row.source))
    ours = {task: {metric: float(metrics[task][metric]) for metric in ms} for task, ms in benchmark.directions.items()}
    comparison.rows.append(ComparedRow(label, ours, against_baseline(ours), "measured"))
    return comparison
