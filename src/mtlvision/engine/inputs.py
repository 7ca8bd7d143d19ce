"""The run's data as the checks see it: ``mtlvision data check`` (every sample) and the cheap checks that
``train`` runs first (files only, :func:`check_before_training`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mtlvision.config import RunConfig
from mtlvision.data.check import DataReport, check_dataset
from mtlvision.data.datasets.base import SPLITS
from mtlvision.data.preflight import preflight
from mtlvision.data.report import DATASET_KINDS, Finding
from mtlvision.engine.build import build_tasks, open_split
from mtlvision.engine.logging import console
from mtlvision.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SHOWN = 5
"""Findings quoted in the message of :func:`check_before_training`."""


def check_config_data(config: RunConfig, splits: Sequence[str] = SPLITS, progress: bool = True) -> DataReport:
    """Read every sample of ``splits`` of the configured dataset, as stored (no resize, no augmentation),
    and check it against the run's tasks (``tasks``, or every task of the dataset)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"data check: unknown split(s) {', '.join(unknown)}; allowed: {', '.join(SPLITS)}.")
    tasks = {task.name: task for task in build_tasks(config)}
    datasets = {split: open_split(config, split) for split in splits}
    if not progress:
        return check_dataset(datasets, tasks)
    columns = (TextColumn("checking {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        bars = {split: bar.add_task(split, total=len(data)) for split, data in datasets.items()}  # type: ignore[arg-type]  # map-style datasets define __len__

        def advance(split: str, done: int, total: int) -> None:
            bar.update(bars[split], completed=done)

        return check_dataset(datasets, tasks, progress=advance)


def _listing(findings: list[Finding]) -> str:
    shown = "; ".join(f"{f.split}/{f.sample}: {f.message}" for f in findings[:SHOWN])
    return shown + (f"; … and {len(findings) - SHOWN} more" if len(findings) > SHOWN else "")


def check_before_training(config: RunConfig) -> DataReport | None:
    """The cheap checks of ``data check`` (:func:`mtlvision.data.preflight.preflight`: the same image file in
    two splits, paths outside the dataset, labels of CSV and list files out of range) over the splits the run
    reads, as ``data.check`` says: ``true`` stops on an error with a DataError listing them, ``warn`` logs them,
    ``false`` skips the checks (returns None).

    With ``data.skip_bad`` a bad sample is not an error here (training skips and counts it); a leak still is.
    """
    if config.data.check is False:
        return None
    tasks = {task.name: task for task in build_tasks(config)}
    splits = dict.fromkeys(["train", "val", config.train.eval_split])
    report = preflight({split: open_split(config, split) for split in splits}, tasks)
    blocking = [f for f in report.errors if f.kind in DATASET_KINDS or not config.data.skip_bad]
    skipped = [f for f in report.errors if f.kind not in DATASET_KINDS and config.data.skip_bad]
    if skipped:
        logger.warning("data check: %d bad sample(s) that data.skip_bad will skip: %s", len(skipped), _listing(skipped))
    if report.warnings:
        logger.warning("data check: %s", _listing(report.warnings))
    if not blocking:
        return report
    bad_samples = any(f.kind not in DATASET_KINDS for f in blocking)
    message = (
        f"data check before training: {len(blocking)} error(s) in the files of the {', '.join(splits)} splits: "
        f"{_listing(blocking)}. Run `mtlvision data check CONFIG` for the full report (it also reads every image). "
        "Fix the data"
        + (", or set data.skip_bad=true to skip the bad samples" if bad_samples else "")
        + "; data.check=warn trains anyway, data.check=false skips these checks."
    )
    if config.data.check == "warn":
        logger.warning(message)
        return report
    raise DataError(message)
