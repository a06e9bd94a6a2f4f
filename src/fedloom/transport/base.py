"""The transport interface: collaborator-pull, streaming, identity from the channel.

A collaborator holds one :class:`Connection`, bound to its site identity when it was
made (the certificate on gRPC, the ``connect(site)`` call in-process). Messages never
carry the sender's name. The aggregator side is an :class:`AggregatorService`, which
every transport calls with the identity it established.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from fedloom.records import Instruction
from fedloom.transport.messages import (
    Chunk,
    FailureReport,
    Heartbeat,
    HeartbeatReply,
    ModelStream,
    PhaseMessage,
    Receipt,
    UpdateHeader,
)


class AggregatorService(Protocol):
    """What the aggregator offers to sites. Implemented by the orchestration layer."""

    def get_task(self, site: str, timeout: float | None) -> Instruction | None:
        """Block until ``site`` has work (or ``timeout`` passes: ``None`` comes back)."""
        ...

    def download(self, site: str, round: int) -> ModelStream:
        """The global model of ``round``, as a header and chunks."""
        ...

    def upload(self, site: str, header: UpdateHeader, chunks: Iterable[Chunk]) -> Receipt:
        """Receive ``site``'s answer to the current round: each chunk is checked and
        folded into the running sum as it arrives; a stream that fails part-way is rolled
        back exactly, and the receipt says why."""
        ...

    def report_failure(self, site: str, report: FailureReport) -> bool:
        """``site`` could not do its task for ``report.round``; True if the report
        settled the site for the open round, False if it was stale."""
        ...

    def exchange(self, site: str, message: PhaseMessage) -> PhaseMessage:
        """One step of a multi-phase round (secure aggregation's key exchange …)."""
        ...

    def heartbeat(self, site: str, beat: Heartbeat) -> HeartbeatReply:
        """``site`` is alive; the reply says which round is open and whether the
        federation has finished."""
        ...


class Connection(Protocol):
    """A collaborator's side of the transport. Only outbound calls."""

    @property
    def site(self) -> str: ...

    def get_task(self, timeout: float | None = None) -> Instruction | None: ...

    def download(self, round: int) -> ModelStream: ...

    def upload(self, header: UpdateHeader, chunks: Iterable[Chunk]) -> Receipt: ...

    def report_failure(self, report: FailureReport) -> None: ...

    def exchange(self, message: PhaseMessage) -> PhaseMessage: ...

    def heartbeat(self, beat: Heartbeat) -> HeartbeatReply: ...

    def close(self) -> None: ...
