"""A task's traceback, fit to travel from where it ran to where a developer reads it.

A simulation's worker process formats the traceback of the exception the task raised
and sends it to the driver beside the one-line reason; the driver writes it to the
run's log, to the failed site's row of ``metrics.jsonl`` and, with ``--verbose``, to
the screen. A real site writes it to its own log only: a traceback may show the
site's data (a value in an error message, a local variable), so what goes to the
aggregator stays the one line.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from types import TracebackType

from fedloom.core.sanitize import printable, shorten

MAX_FRAMES = 50
"""Frames of each exception of the chain kept (the innermost ones, where it raised)."""

MAX_TRACEBACK_CHARS = 16 * 1024
"""Characters of a whole traceback kept: its beginning and its end (what raised)."""

MAX_LINE_CHARS = 1000
"""Characters of one line of it (a huge array printed in a message is cut)."""

_FEDLOOM = str(Path(__file__).resolve().parents[1]) + os.sep


def task_traceback(err: BaseException) -> str:
    """``err``'s traceback as text: fedloom's own frames above the first frame of the
    user's code left out, at most :data:`MAX_FRAMES` frames per exception, each line
    :func:`~fedloom.core.sanitize.printable` (control characters escaped) and cut at
    :data:`MAX_LINE_CHARS`, the whole cut to :data:`MAX_TRACEBACK_CHARS` (keeping its
    beginning and its end)."""
    lines = traceback.format_exception(
        type(err), err, _from_user_code(err.__traceback__), limit=-MAX_FRAMES
    )
    text = "".join(lines).rstrip("\n")
    safe = "\n".join(printable(line, MAX_LINE_CHARS) for line in text.split("\n"))
    return shorten(safe, MAX_TRACEBACK_CHARS)


def one_line(err: BaseException) -> str:
    """``err`` in one line: ``ValueError: the message``."""
    return traceback.format_exception_only(err)[-1].strip()


def _from_user_code(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from its first frame outside fedloom's package (the user's task), or whole
    if every frame is fedloom's (fedloom itself refused something)."""
    start = tb
    while start is not None and _is_fedloom(start):
        start = start.tb_next
    return tb if start is None else start


def _is_fedloom(tb: TracebackType) -> bool:
    return tb.tb_frame.f_code.co_filename.startswith(_FEDLOOM)
