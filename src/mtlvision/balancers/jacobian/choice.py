"""``balancer.jacobian: auto``: the Jacobian path chosen by timing each applicable one, once per key.

Every path gives the same update to float tolerance; only speed and peak memory differ, and which is fastest
depends on the model, the batch, T and the device (docs/balancers.md, "Where the time goes"). The engine times
each candidate on the first step whose key is new (the graph retained, the results discarded) and keeps the
choice in :data:`CHOSEN_PATHS` for the process and in a small JSON file: the run folder's
``jacobian_paths.json`` when the caller knows one, else :func:`default_cache_file`. A file that cannot be
read is ignored with a warning (JSON only, never unpickled) and rewritten atomically.

The candidates come lightest first (the engine orders them by :data:`~mtlvision.balancers.jacobian.BY_MEMORY`),
and a heavier path is taken only where it is faster than the lighter choice by :data:`HEAVIER_MARGIN`: the
per-task loop holds the whole ``[T, P]`` Jacobian and more (2.5x an equal-weights step's peak at T = 3 on
resnet18, the layer path 1.14x), so a near tie, or a measurement made on a busy machine, keeps the light path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: the file name of the disk cache in a run folder or the user cache directory
CACHE_NAME = "jacobian_paths.json"
#: timed computations per candidate path (alternating between paths; the fastest of each path's is kept)
REPEATS = 2
#: a heavier candidate is chosen only if its time is below this fraction of the lighter choice's
HEAVIER_MARGIN = 0.9


@dataclass(frozen=True)
class PathChoice:
    """The path chosen for one key, and each candidate's fastest time in seconds."""

    path: str
    seconds: dict[str, float]
    key: str


#: the choices made (or read from disk) in this process, by key
CHOSEN_PATHS: dict[str, PathChoice] = {}
#: the (file, key) pairs this process knows to be on disk (a choice made for one run is also written to the next)
_ON_DISK: set[tuple[Path, str]] = set()


def pick(seconds: dict[str, float], candidates: Sequence[str]) -> str:
    """The path taken given each candidate's ``seconds``: ``candidates`` lightest first, each heavier one
    replacing the choice only where it is faster by :data:`HEAVIER_MARGIN`."""
    chosen = candidates[0]
    for path in candidates[1:]:
        if seconds[path] < HEAVIER_MARGIN * seconds[chosen]:
            chosen = path
    return chosen


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``), else what :mod:`platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def machine_name(device_type: str) -> str:
    """What the speed of a path depends on beyond torch: the GPU's name, or the CPU's model and count (a
    cache in a home folder shared by several machines keeps one choice per machine kind)."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} x{os.cpu_count()}"


def now() -> float:
    """The clock the measurement reads (monkeypatched by tests to make the choice deterministic)."""
    return time.perf_counter()


def default_cache_file() -> Path:
    """``$XDG_CACHE_HOME/mtlvision/jacobian_paths.json`` (``~/.cache`` when the variable is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mtlvision" / CACHE_NAME


def path_key(
    shapes: Sequence[Sequence[int]], num_tasks: int, device: torch.device, dtype: torch.dtype, extra: Sequence[Any]
) -> str:
    """A short stable key for one measurement: the model signature and batch (``shapes``: the shared
    parameters', the representation's and the tapped inputs' shapes), T, device, dtype, ``extra`` (the
    balancer's needs, the candidates), the torch version and its thread count, and the machine
    (:func:`machine_name`)."""
    text = repr(
        (
            [tuple(s) for s in shapes],
            num_tasks,
            str(device),
            str(dtype),
            list(extra),
            torch.__version__,
            torch.get_num_threads(),
            machine_name(torch.device(device).type),
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _read(file: Path) -> dict[str, Any]:
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as error:
        warnings.warn(f"ignoring the Jacobian path cache {file}: {error}", stacklevel=3)
        return {}


def _from_disk(file: Path, key: str, candidates: Sequence[str]) -> PathChoice | None:
    entry: Any = _read(file).get(key)
    try:
        choice = PathChoice(str(entry["path"]), {str(k): float(v) for k, v in entry["seconds"].items()}, key)
    except (TypeError, KeyError, AttributeError, ValueError):
        return None
    if not set(candidates) <= set(choice.seconds):
        return None
    # the choice is re-derived from the times, so that the rule in force applies to an older entry too
    return PathChoice(pick(choice.seconds, candidates), choice.seconds, key)


def _to_disk(file: Path, choice: PathChoice) -> None:
    """Add ``choice`` to ``file``, written to a temporary file and renamed over it."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        data = _read(file)
        data[choice.key] = {"path": choice.path, "seconds": choice.seconds}
        partial = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(partial, file)
    except OSError as error:
        warnings.warn(f"could not write the Jacobian path cache {file}: {error}", stacklevel=3)


def choose_path(
    key: str, candidates: Sequence[str], run: Callable[[str], None], cache_file: Path | None = None
) -> PathChoice:
    """The path for ``key`` among ``candidates`` (lightest first; see :func:`pick`): from this process's
    :data:`CHOSEN_PATHS`, else from ``cache_file`` (default :func:`default_cache_file`), else measured:
    ``run(path)`` timed :data:`REPEATS` times per path, alternating, and recorded in both."""
    if not candidates:
        raise ValueError("choose_path needs at least one candidate path")
    file = cache_file if cache_file is not None else default_cache_file()
    choice = CHOSEN_PATHS.get(key)
    if choice is not None and choice.path in candidates:
        if (file, key) not in _ON_DISK:
            _to_disk(file, choice)
            _ON_DISK.add((file, key))
        return choice
    choice = _from_disk(file, key, candidates)
    if choice is None:
        seconds: dict[str, float] = {}
        for _ in range(REPEATS):
            for path in candidates:
                start = now()
                run(path)
                seconds[path] = min(seconds.get(path, float("inf")), now() - start)
        choice = PathChoice(pick(seconds, candidates), seconds, key)
        _to_disk(file, choice)
        source = "measured"
    else:
        source = f"read from {file}"
    CHOSEN_PATHS[key] = choice
    _ON_DISK.add((file, key))
    times = ", ".join(f"{p} {s * 1e3:.1f} ms" for p, s in choice.seconds.items())
    logger.info("balancer.jacobian=auto chose %r (%s; %s)", choice.path, source, times)
    return choice


__all__ = [
    "CACHE_NAME",
    "CHOSEN_PATHS",
    "HEAVIER_MARGIN",
    "PathChoice",
    "choose_path",
    "cpu_model",
    "default_cache_file",
    "machine_name",
    "path_key",
    "pick",
]
