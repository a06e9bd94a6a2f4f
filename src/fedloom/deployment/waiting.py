"""What a collaborator says while it waits for the aggregator, and what the
aggregator's last word means to it.

A site waits for an aggregator it cannot reach (not started yet, restarting, the
network) and for one that stopped before the federation completed (Ctrl-C, a failure:
started again, it resumes the run). :class:`WaitNotices` says each change of what it
waits for, and why, once, not once per try; :func:`federation_completed` reads the
aggregator's "finished".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fedloom.core.errors import FederationCancelled
from fedloom.core.records import Ending, Instruction

log = logging.getLogger("fedloom.collaborator")


def federation_completed(finished: Instruction) -> bool:
    """Whether the aggregator's "finished" says the federation completed (True), or
    that the aggregator stopped before (False: interrupted, failed; started again, it
    resumes the run, so the site waits for it). Raises :class:`FederationCancelled`
    when its operator cancelled the federation."""
    if finished.ending is Ending.CANCELLED:
        raise FederationCancelled(
            "the aggregator's operator cancelled the federation (`fedloom aggregator stop "
            "--cancel`): its run will not resume",
            hint="nothing to do here: this site's audit log keeps what it sent; start the "
            "collaborator again to take part in a new run",
        )
    return finished.ending is Ending.COMPLETED


# WaitNotices' reason for an aggregator that said it stopped (never one of wait_reason's)
_STOPPED = "\x00stopped"


class WaitNotices:
    """What the site waits for, said through ``say`` once per change (never once per
    try): why the aggregator at ``address`` cannot be reached, that it stopped before
    the federation completed, and that it answers again. The connection calls it with
    each try's reason, and None once a call gets through after waiting; its heartbeat
    thread too, so it is thread-safe."""

    def __init__(
        self, address: str, give_up: float | None, say: Callable[[str], None] | None
    ) -> None:
        self.address = address
        self._say = say or (lambda line: None)
        self._limit = (
            f"giving up after {give_up:g} s without an answer"
            if give_up is not None
            else "without a time limit (--give-up-after sets one)"
        )
        self._shown: str | None = None  # the reason on the screen now
        self._lock = threading.Lock()

    def __call__(self, reason: str | None) -> None:
        with self._lock:
            if reason == self._shown:
                return
            self._shown = reason
        if reason is None:
            self.say(f"reached the aggregator at {self.address}")
        elif reason == _STOPPED:
            line = (
                "the aggregator stopped before the federation completed (interrupted, or "
                f"failed): waiting for it to start again and resume the run, {self._limit}"
            )
            log.warning("%s", line)
            self.say(line)
        else:
            self.say(
                f"waiting for the aggregator at {self.address}: {reason}; trying again, "
                f"{self._limit}"
            )

    def stopped(self) -> None:
        """The aggregator said it stopped before the federation completed."""
        self(_STOPPED)

    def say(self, line: str) -> None:
        self._say(line)
