"""The in-process transport: the simulation engine and the test double.

With ``roundtrip=True`` every message is encoded to protobuf bytes and decoded again,
exactly as it would cross the network, so a simulation exercises the wire format
without sockets. Without it, tensors pass as zero-copy views.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from fedloom.core.records import Instruction
from fedloom.transport import serde
from fedloom.transport.base import AggregatorService
from fedloom.transport.messages import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    Heartbeat,
    HeartbeatReply,
    ModelHeader,
    ModelStream,
    UpdateHeader,
    UploadReceipt,
)
from fedloom.transport.traffic import TrafficCounter

M = TypeVar("M")


class InProcessTransport:
    """Connects sites to an :class:`AggregatorService` in the same process."""

    def __init__(self, service: AggregatorService, *, roundtrip: bool = False) -> None:
        self.service = service
        self.roundtrip = roundtrip
        self.traffic = TrafficCounter()

    def connect(self, site: str) -> InProcessConnection:
        return InProcessConnection(self, site)

    def _pass(self, message: M, *, down: bool) -> M:
        """Deliver one message: through the wire format when round-tripping."""
        if self.roundtrip:
            data = serde.encode(message)
            size = len(data)
            message = serde.decode(type(message), data)
        else:
            size = len(message.data) if isinstance(message, Chunk) else 0
        if down:
            self.traffic.add(sent=size)
        else:
            self.traffic.add(received=size)
        return message


class InProcessConnection:
    """One site's connection; its identity is fixed when it is made."""

    def __init__(self, transport: InProcessTransport, site: str) -> None:
        self._transport = transport
        self._site = site

    @property
    def site(self) -> str:
        return self._site

    def get_instruction(self, timeout: float | None = None) -> Instruction | None:
        instruction = self._transport.service.get_instruction(self._site, timeout)
        return None if instruction is None else self._transport._pass(instruction, down=True)

    def download(self, round: int) -> ModelStream:
        stream = self._transport.service.download(self._site, round)
        header: ModelHeader = self._transport._pass(stream.header, down=True)
        return ModelStream(header, self._relay(stream.chunks, down=True))

    def upload(self, header: UpdateHeader, chunks: Iterable[Chunk]) -> UploadReceipt:
        sent_header = self._transport._pass(header, down=False)
        receipt = self._transport.service.upload(
            self._site, sent_header, self._relay(iter(chunks), down=False)
        )
        return self._transport._pass(receipt, down=True)

    def report_failure(self, report: FailureReport) -> None:
        self._transport.service.report_failure(
            self._site, self._transport._pass(report, down=False)
        )

    def exchange(self, message: ExchangeMessage) -> ExchangeMessage:
        sent = self._transport._pass(message, down=False)
        reply = self._transport.service.exchange(self._site, sent)
        return self._transport._pass(reply, down=True)

    def heartbeat(self, beat: Heartbeat) -> HeartbeatReply:
        reply = self._transport.service.heartbeat(
            self._site, self._transport._pass(beat, down=False)
        )
        return self._transport._pass(reply, down=True)

    def close(self) -> None:
        return None  # nothing to release in-process

    def _relay(self, chunks: Iterator[Chunk], *, down: bool) -> Iterator[Chunk]:
        for chunk in chunks:
            yield self._transport._pass(chunk, down=down)
