"""Injectable time and fault points.

The round loop never reads the wall clock or sleeps directly: it asks a :class:`Clock`
for the time and waits on a condition through it. Tests use :class:`ManualClock` to
reach a deadline without waiting, and :class:`FaultPoints` to stop a run at a named
point (``"round.aggregated"``) without timing anything.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def wait(self, condition: threading.Condition, deadline: float | None) -> None:
        """Wait on ``condition`` (held by the caller) until notified or ``deadline``."""
        ...


class SystemClock:
    """The real monotonic clock."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, deadline: float | None) -> None:
        if deadline is None:
            condition.wait()
        else:
            condition.wait(timeout=max(0.0, deadline - time.monotonic()))


class ManualClock:
    """A clock that moves only when a test calls :meth:`advance`."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._conditions: list[threading.Condition] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def wait(self, condition: threading.Condition, deadline: float | None) -> None:
        with self._lock:
            if condition not in self._conditions:
                self._conditions.append(condition)
            if deadline is not None and self._now >= deadline:
                return
        condition.wait()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            conditions = list(self._conditions)
        for c in conditions:
            with c:
                c.notify_all()


FaultHook = Callable[[str, dict[str, Any]], None]


class FaultPoints:
    """Named points in the code where a test may inject a failure.

    ``faults.arm("round.aggregated", hook)`` makes the next ``faults.hit(...)`` of that
    name call ``hook(name, context)``; the hook may raise (a crash), block, or record.
    Unarmed points cost one dict lookup.
    """

    def __init__(self) -> None:
        self._hooks: dict[str, FaultHook] = {}
        self._lock = threading.Lock()

    def arm(self, name: str, hook: FaultHook) -> None:
        with self._lock:
            self._hooks[name] = hook

    def disarm(self, name: str) -> None:
        with self._lock:
            self._hooks.pop(name, None)

    def hit(self, name: str, **context: Any) -> None:
        hook = self._hooks.get(name)
        if hook is not None:
            hook(name, context)


def kill_fault(spec: str) -> FaultPoints:
    """Fault points that SIGKILL this process, for tests of what a dead process does to
    the federation: ``POINT[@ROUND[:INDEX]]``. ``site.upload.chunk@2:1`` kills a site as
    it is about to send the second chunk of its round-2 update; where a point's context
    has no ``index`` (``upload.chunk``, ``round.waiting``), INDEX counts its hits in that
    round from 0."""
    point, _, where = spec.partition("@")
    round_text, _, index_text = where.partition(":")
    faults = FaultPoints()
    hits = 0

    def kill(name: str, context: dict[str, Any]) -> None:
        nonlocal hits
        if round_text and context.get("round") != int(round_text):
            return
        if index_text:
            index = context.get("index", hits)
            hits += 1
            if index != int(index_text):
                return
        logging.getLogger("fedloom").warning("fault %s: killing this process", spec)
        for handler in logging.getLogger("fedloom").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    faults.arm(point, kill)
    return faults
