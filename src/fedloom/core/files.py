"""Atomic file writes: a crash leaves the old file or the new one, never half of either."""

from __future__ import annotations

import os
from pathlib import Path

from fedloom.core.errors import FedloomError


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    error: type[FedloomError] = FedloomError,
) -> None:
    """Write ``data`` to a temporary file next to ``path`` created with ``mode``, fsync it,
    then rename it over ``path``: a crash leaves the old file or the new one. A failure
    raises ``error`` (the kind of file it is: a certificate, a policy ...)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise error(
            f"cannot write {path}: {err.strerror}",
            hint="check that the folder exists and that you may write to it",
        ) from err
    if os.name == "posix":
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
