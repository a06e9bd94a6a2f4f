"""One process per state folder: the ``fcntl`` locks of the aggregator's state
(``aggregator.lock``) and of a site's (``collaborator.lock``).

The OS releases a lock when its process ends, however it ends, so a lock left by a
killed process never blocks its restart. ``fedloom status`` takes a shared lock for an
instant to learn whether an aggregator holds its workspace (:func:`running_pid`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import IO

from fedloom.core.errors import StateError, naming

LOCK_FILE = "aggregator.lock"


def lock_state(state_dir: Path) -> IO[str]:
    """Hold ``state_dir``'s lock for this process's life: a second aggregator on the
    same workspace is refused instead of writing the same state."""
    try:
        return hold_lock(state_dir / LOCK_FILE, f"{os.getpid()}\n", tries=20)
    except LockBusy as busy:
        raise StateError(
            f"another aggregator (pid {busy.holder or '?'}) is running on this workspace "
            f"({state_dir})",
            hint="stop it first; `fedloom status` shows what it is doing",
        ) from None


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is what it wrote in the file."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: Path, holder: str, *, tries: int = 1) -> IO[str]:
    """Take ``path``'s exclusive ``fcntl`` lock (the OS releases it when the process
    ends, however it ends) and write ``holder`` in the file; the lock is held until the
    returned file is closed. :class:`LockBusy` if another process holds it."""
    fh = open(path, "a+")  # noqa: SIM115 - held until the caller closes it
    try:
        _take(fh, tries)
    except BlockingIOError:
        fh.seek(0)
        held_by = fh.read().strip()
        fh.close()
        raise LockBusy(held_by) from None
    try:
        with naming(path):
            fh.truncate(0)
            fh.write(holder)
            fh.flush()
    except BaseException:
        with contextlib.suppress(OSError):  # its flush fails again; the file is closed
            fh.close()
        raise
    return fh


def _take(fh: IO[str], tries: int = 20) -> None:
    """The exclusive lock, tried for about a second: `fedloom status` holds a shared
    one for an instant while it looks."""
    pause = threading.Event()
    for attempt in range(tries):
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            pause.wait(0.05)


def wait_released(state_dir: Path) -> None:
    """Block until no aggregator holds ``state_dir``'s lock (the one holding it has
    exited, however it ended)."""
    path = state_dir / LOCK_FILE
    if not path.exists():
        return
    with open(path) as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)  # waits in the kernel: no polling
        fcntl.flock(fh, fcntl.LOCK_UN)


def running_pid(state_dir: Path) -> int | None:
    """The pid of the aggregator holding ``state_dir``'s lock, or None if none does."""
    path = state_dir / LOCK_FILE
    if not path.exists():
        return None
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = fh.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None
