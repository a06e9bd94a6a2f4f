"""Durable file writes: the one fsync-and-rename writer, and the one folder fsync.

A file is written to a temporary name in its folder, fsynced, renamed over its name, and
the folder fsynced: a crash leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fedloom.core.errors import FedloomError, naming


def fsync_dir(folder: Path) -> None:
    """Make ``folder``'s entries (a file renamed or made in it) survive a power cut."""
    if os.name != "posix":
        return  # elsewhere a folder cannot be opened to sync it
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_atomically(
    path: Path,
    write: Callable[[BinaryIO], object],
    *,
    mode: int = 0o644,
    tmp: Path | None = None,
    make_folder: bool = False,
    before_rename: Callable[[Path], None] | None = None,
) -> None:
    """``write`` fills a temporary file next to ``path`` (``tmp``, or a hidden name with
    this process's id, made exclusively), created with ``mode``; it is fsynced and
    renamed over ``path`` and the folder fsynced. With ``make_folder`` a missing folder is
    made (and its own entry fsynced). ``before_rename`` sees the written temporary file
    (a fault point). An OSError propagates, naming the file; the temporary file is
    removed."""
    if make_folder and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent.parent)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if tmp else os.O_EXCL)
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with naming(tmp):
            with os.fdopen(os.open(tmp, flags, mode), "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file helps no one (a full disk)
        raise
    if before_rename is not None:
        before_rename(tmp)  # a crash here leaves only the temporary file
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    error: type[FedloomError] = FedloomError,
) -> None:
    """Write ``data`` over ``path`` with :func:`replace_atomically`. A failure raises
    ``error`` (the kind of file it is: a certificate, a policy ...)."""
    try:
        replace_atomically(path, lambda fh: fh.write(data), mode=mode)
    except OSError as err:
        raise error(
            f"cannot write {path}: {err.strerror}",
            hint="check that the folder exists and that you may write to it",
        ) from err
