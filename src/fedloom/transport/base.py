"""The transport interface: collaborator-pull, streaming, identity from the channel.

A collaborator holds one :class:`Connection`, bound to its site identity when it was
made (the certificate on gRPC, the ``connect(site)`` call in-process). Messages never
carry the sender's name. The aggregator side is an :class:`AggregatorService`, which
every transport calls with the identity it established.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from fedloom.core.records import Instruction
from fedloom.transport.messages import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    Heartbeat,
    HeartbeatReply,
    ModelStream,
    UpdateHeader,
    UploadReceipt,
)


class Cancellation:
    """Tells a blocking service call that nobody waits for its answer any more (the
    caller hung up, or its session was replaced), so it returns at once instead of
    holding a server thread until its timeout.

    The call registers a wake-up with :meth:`on_cancel` (notify the condition it waits
    on) and checks :attr:`cancelled` each time it wakes. :meth:`cancel` may come from
    any thread, once or many times, before or after the wake-up is registered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._wakeups: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        with self._lock:
            return self._cancelled

    def on_cancel(self, wakeup: Callable[[], None]) -> None:
        """Call ``wakeup`` when cancelled (at once if it already is)."""
        with self._lock:
            if not self._cancelled:
                self._wakeups.append(wakeup)
                return
        wakeup()

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            wakeups, self._wakeups = self._wakeups, []
        for wakeup in wakeups:
            wakeup()


class AggregatorService(Protocol):
    """What the aggregator offers to sites. Implemented by the orchestration layer."""

    def get_instruction(
        self, site: str, timeout: float | None, cancel: Cancellation | None = None
    ) -> Instruction | None:
        """Block until ``site`` has work (or ``timeout`` passes, or ``cancel`` is
        cancelled: ``None`` comes back)."""
        ...

    def download(self, site: str, round: int) -> ModelStream:
        """The global model of ``round``, as a header and chunks."""
        ...

    def upload(self, site: str, header: UpdateHeader, chunks: Iterable[Chunk]) -> UploadReceipt:
        """Receive ``site``'s answer to the current round: each chunk is checked and
        folded into the running sum as it arrives; a stream that fails part-way is rolled
        back exactly, and the receipt says why."""
        ...

    def report_failure(self, site: str, report: FailureReport) -> bool:
        """``site`` could not do its task for ``report.round``; True if the report
        settled the site for the open round, False if it was stale. A withdrawal
        (``report.withdrawn``) is never stale: the site is not waited for any more,
        until it says Hello again (:meth:`join`)."""
        ...

    def join(self, site: str) -> None:
        """A collaborator process of ``site`` said Hello: it takes part, and a
        withdrawal it made earlier no longer holds."""
        ...

    def exchange(self, site: str, message: ExchangeMessage) -> ExchangeMessage:
        """One step of a multi-step round (secure aggregation's key exchange …)."""
        ...

    def heartbeat(self, site: str, beat: Heartbeat) -> HeartbeatReply:
        """``site`` is alive; the reply says which round is open and whether the
        federation has finished."""
        ...


class Connection(Protocol):
    """A collaborator's side of the transport. Only outbound calls."""

    @property
    def site(self) -> str: ...

    def get_instruction(self, timeout: float | None = None) -> Instruction | None: ...

    def download(self, round: int) -> ModelStream: ...

    def upload(self, header: UpdateHeader, chunks: Iterable[Chunk]) -> UploadReceipt: ...

    def report_failure(self, report: FailureReport) -> None: ...

    def exchange(self, message: ExchangeMessage) -> ExchangeMessage: ...

    def heartbeat(self, beat: Heartbeat) -> HeartbeatReply: ...

    def close(self) -> None: ...
