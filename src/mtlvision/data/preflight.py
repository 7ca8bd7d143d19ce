"""The cheap checks run before training: files and in-memory labels only, no image decoded.

``mtlvision data check`` reads every sample (:mod:`mtlvision.data.check`), which takes as long as an epoch
and more. Before training, :func:`preflight` looks only at what the datasets know without decoding anything
(``sample_source`` and ``known_targets``, see :mod:`mtlvision.data.datasets.base`):

============== ======== ==================================================================================
kind           severity what
============== ======== ==================================================================================
duplicate      error    the same image file in two splits, by identity (same file, hard or symbolic link)
                        or by content (identical bytes): a leak of training images into evaluation
duplicate      warning  the same image file twice within one split
outside_root   error    a dataset file names a path outside the dataset's folder
invalid_label  error    a label held in a CSV or list file that its task refuses (class index out of range)
============== ======== ==================================================================================

Cost: one ``stat`` per image, and a hash of the files whose byte size equals that of a file in another
split or the same one (so that usually almost nothing is read). Datasets that cannot describe their samples
(the built-in synthetic ones) are skipped.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from torch.utils.data import Dataset

from mtlvision.data.datasets.base import known_targets_of, sample_source_of
from mtlvision.data.report import DataReport, Finding, SplitStats
from mtlvision.errors import DataError
from mtlvision.tasks.base import Task

Member = tuple[str, str, Path]
"""(split, sample id, image file)"""


def _describes(dataset: Dataset) -> bool:
    """Whether ``dataset`` (or one it wraps) can describe its samples without reading them."""
    current: object = dataset
    while not hasattr(current, "sample_source"):
        current = getattr(current, "dataset", None)
        if current is None:
            return False
    return True


def _digest(path: Path) -> str | None:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _duplicates(members: dict[tuple[int, int], list[Member]], sizes: dict[int, list[tuple[int, int]]]) -> list[Finding]:
    """Findings for files met twice: by identity (device, inode), or by content among files of equal size."""
    content: dict[object, list[tuple[int, int]]] = defaultdict(list)
    for size, identities in sizes.items():
        for identity in identities:
            digest = _digest(members[identity][0][2]) if len(identities) > 1 else None
            content[("bytes", size, digest) if digest is not None else identity].append(identity)
    findings = []
    for identities in content.values():
        group = [(member, identity) for identity in identities for member in members[identity]]
        if len(group) < 2:
            continue
        (first_split, first_id, _), first_identity = group[0]
        for (split, sample, _), identity in group[1:]:
            how = "the same image file as" if identity == first_identity else "an identical copy of the image of"
            leak = split != first_split
            message = f"{how} {first_split}/{first_id}" + (" (a leak into evaluation)" if leak else "")
            findings.append(Finding("error" if leak else "warning", "duplicate", split, sample, None, message))
    return findings


def preflight(splits: Mapping[str, Dataset], tasks: Mapping[str, Task]) -> DataReport:
    """The file-level checks of the module docstring over ``splits`` (name -> dataset, untransformed)."""
    findings: list[Finding] = []
    stats: dict[str, SplitStats] = {}
    members: dict[tuple[int, int], list[Member]] = defaultdict(list)
    sizes: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for split, dataset in splits.items():
        total = len(dataset)  # type: ignore[arg-type]  # map-style datasets define __len__
        split_stats = stats[split] = SplitStats(samples=total)
        if not _describes(dataset):
            continue
        for index in range(total):
            try:
                source = sample_source_of(dataset, index)
            except DataError as error:
                split_stats.bad += 1
                kind = getattr(error, "kind", "unreadable")
                findings.append(Finding("error", kind, split, f"{split}[{index}]", None, str(error)))
                continue
            if source is None:
                continue
            problems: list[tuple[str | None, str]] = []
            try:
                known = known_targets_of(dataset, index)
            except DataError as error:
                problems.append((None, str(error)))
                known = {}
            for name, target in known.items():
                if name in tasks:
                    try:
                        tasks[name].check_target(target, f"{split}/{source.id}")
                    except DataError as error:
                        problems.append((name, str(error)))
            findings += [
                Finding("error", "invalid_label", split, source.id, task, message) for task, message in problems
            ]
            split_stats.bad += bool(problems)
            if source.image is None:
                continue
            try:
                status = os.stat(source.image)
            except OSError:
                continue  # a missing file is the reader's to report
            identity = (status.st_dev, status.st_ino)
            if identity not in members:
                sizes[status.st_size].append(identity)
            members[identity].append((split, source.id, source.image))
    return DataReport(stats, findings + _duplicates(members, sizes))
