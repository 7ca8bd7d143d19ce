"""Paths read from dataset files stay inside the folder they are relative to.

A split list, a label CSV, a COCO ``file_name`` or a YOLO ``data.yaml`` names files by paths that the
dataset's author wrote; a line such as ``../../../home/me/.ssh/id_rsa.png`` or ``/etc/passwd`` must not make
the loader read (or train on, or report the existence of) a file outside the dataset. :func:`confined` joins
such a path to its folder and refuses it with :class:`UnsafePath` unless it stays inside.

The test is lexical (``os.path.normpath``, no file-system access): absolute paths and ``..`` parts that climb
out are refused before anything is opened. Symbolic links inside the folder are followed: they were put
there by whoever owns the folder, whereas the threat is the text of a file naming paths.
"""

from __future__ import annotations

import os
from pathlib import Path

from mtlvision.errors import DataError


class UnsafePath(DataError):
    """A dataset file names a path outside the folder it must stay in; nothing was read."""

    kind = "outside_root"


def confined(base: Path, relative: str, where: str) -> Path:
    """``base / relative`` normalised, or :class:`UnsafePath` naming ``where`` when it leaves ``base``.

    ``where`` says which file (and line) named the path, e.g. ``"splits/train.txt, line 3"``.
    """
    base_norm = Path(os.path.normpath(base))
    joined = Path(os.path.normpath(base_norm / relative))
    if Path(relative).is_absolute() or not joined.is_relative_to(base_norm) or joined == base_norm:
        raise UnsafePath(
            f"{where}: the path {relative!r} leads outside {base_norm}; a dataset file may only name files inside "
            "its folder (absolute paths and '..' climbing out are refused, and the file was not read)."
        )
    return joined
