"""The run's data as the checks see it (``mtlvision data check``)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mtlvision.config import RunConfig
from mtlvision.data.check import DataReport, check_dataset
from mtlvision.data.datasets.base import SPLITS
from mtlvision.engine.build import build_tasks, dataset_source
from mtlvision.engine.logging import console
from mtlvision.errors import ConfigError


def check_config_data(config: RunConfig, splits: Sequence[str] = SPLITS, progress: bool = True) -> DataReport:
    """Read every sample of ``splits`` of the configured dataset, as stored (no resize, no augmentation),
    and check it against the run's tasks (``tasks``, or every task of the dataset)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"data check: unknown split(s) {', '.join(unknown)}; allowed: {', '.join(SPLITS)}.")
    tasks = {task.name: task for task in build_tasks(config)}
    source, params = dataset_source(config)
    datasets = {split: source.build(params, split) for split in splits}
    if not progress:
        return check_dataset(datasets, tasks)
    columns = (TextColumn("checking {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        bars = {split: bar.add_task(split, total=len(data)) for split, data in datasets.items()}  # type: ignore

        def advance(split: str, done: int, total: int) -> None:
            bar.update(bars[split], completed=done)

        return check_dataset(datasets, tasks, progress=advance)
