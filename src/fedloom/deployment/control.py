"""``fedloom aggregator stop``: stopping the aggregator of a workspace from another
process, on its machine.

A plain stop is Ctrl-C by another hand (SIGTERM): the run is interrupted, resumes when
the aggregator is started again, and its sites wait for it. A cancel
(:data:`CANCEL_SIGNAL`, which the aggregator turns into
:class:`~fedloom.core.errors.Cancelled`) ends the federation for good: the run is recorded
as cancelled and never resumed, and the sites that ask for work are told so and stop.
Either way the command returns once the aggregator has exited (its state lock is
free), and says how the run was left.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedloom.core.errors import StateError
from fedloom.store.database import ENDED
from fedloom.store.locks import lock_state, running_pid, wait_released
from fedloom.store.runs import RunStore

CANCEL_SIGNAL = signal.SIGUSR1
CANCEL_NOTE = "cancelled with `fedloom aggregator stop --cancel`"


@dataclass(frozen=True)
class Stopped:
    """How ``fedloom aggregator stop`` left the workspace."""

    pid: int | None  # the aggregator it stopped; None when none was running
    run: str | None  # the latest run's name (None: there is none)
    status: str | None  # its status now: interrupted, cancelled, completed …


def stop_aggregator(
    workspace: str | Path,
    *,
    cancel: bool = False,
    on_signalled: Callable[[int], None] | None = None,
) -> Stopped:
    """Stop the aggregator serving ``workspace`` (SIGTERM, or :data:`CANCEL_SIGNAL`
    with ``cancel``), told to ``on_signalled`` with its pid, and wait until it has
    exited. With ``cancel``, the latest run is recorded as cancelled unless it is over
    already, whether an aggregator was running or not. :class:`StateError` when the
    workspace has no aggregator state, or (without ``cancel``) none is running."""
    state_dir = Path(workspace).resolve() / "aggregator"
    if not state_dir.is_dir():
        raise StateError(
            f"{workspace} has no aggregator state ({state_dir}): no aggregator ever ran here",
            hint="give the workspace the aggregator was started with",
        )
    pid = running_pid(state_dir)
    if pid is not None:
        if pid < 0:
            raise StateError(
                f"an aggregator holds the state of {workspace}, but its pid is not recorded",
                hint="stop it where it runs (Ctrl-C in its terminal)",
            )
        try:
            os.kill(pid, CANCEL_SIGNAL if cancel else signal.SIGTERM)
        except ProcessLookupError:
            pass  # it ended meanwhile
        if on_signalled is not None:
            on_signalled(pid)
        wait_released(state_dir)
    elif not cancel:
        raise StateError(
            f"no aggregator is running on {workspace}",
            hint="`fedloom status` shows how its latest run ended; --cancel cancels it "
            "if it is unfinished",
        )
    lock = lock_state(state_dir)  # no aggregator starts while the run is marked
    try:
        store = RunStore(state_dir)
        try:
            latest = store.latest_run()
            if latest is None:
                return Stopped(pid, None, None)
            if cancel and latest.status not in ENDED:
                store.mark(latest, "cancelled", CANCEL_NOTE)
            return Stopped(pid, latest.name, store.reload(latest).status)
        finally:
            store.close()
    finally:
        lock.close()
