"""One process at a time in a run folder.

While a process trains or resumes in a run folder it holds an advisory lock (``fcntl.flock``) on the
folder's ``.lock`` file, which names its process id; a second process is refused with a clear message
instead of interleaving checkpoints. The lock goes with the process, so a killed run never leaves its folder
locked. Taking the lock also removes what a killed process left half-written there (the ``.NAME.*.tmp``
files of :func:`~mtlvision.engine.checkpoint.atomic_write`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mtlvision.engine.runs import LOCK_NAME
from mtlvision.errors import MtlvisionError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no lock there
    fcntl = None  # type: ignore[assignment]  # None marks the missing module (no locking)

logger = logging.getLogger(__name__)


class RunFolderBusy(MtlvisionError):
    """Another process is training or resuming in this run folder."""


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``run_dir``; returns them."""
    stale = sorted(p for p in Path(run_dir).glob(".*.tmp") if p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info(
            "Removed %d half-written file(s) left in %s: %s", len(stale), run_dir, ", ".join(p.name for p in stale)
        )
    return stale


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


@contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration (refused with :class:`RunFolderBusy` when another process has
    it); stale temporary files are removed once it is held."""
    run_dir = Path(run_dir)
    if fcntl is None:  # pragma: no cover
        remove_stale_temporaries(run_dir)
        yield
        return
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"{run_dir} is in use by another mtlvision process{holder} that is training in it; wait until it "
                "ends (or stop it) before training or resuming this run"
            ) from None
        try:  # the holder before us removes the file as it lets go: make sure we locked the file in place
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temporaries(run_dir)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
