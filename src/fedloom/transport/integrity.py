"""A CRC-32 per tensor on a chunk stream: stamped by the sender, checked by the receiver.

TLS already protects the bytes on the wire; the checksum catches what TLS cannot: a
sender whose chunking or buffering went wrong, or a stream reassembled out of order.
The last chunk of each tensor carries the CRC-32 of the whole tensor's bytes.
"""

from __future__ import annotations

import dataclasses
import threading
import zlib
from collections.abc import Iterable, Iterator

from fedloom.core.errors import UpdateRejected
from fedloom.core.weights import TensorSpec
from fedloom.transport.messages import Chunk


def stamp(
    specs: tuple[TensorSpec, ...], chunks: Iterable[Chunk], crcs: list[int] | None = None
) -> Iterator[Chunk]:
    """``chunks`` with the tensor's CRC-32 set on each tensor's last chunk. ``crcs``, when
    given, receives each tensor's CRC-32 as the stream goes."""
    if crcs is None:
        crcs = []
    crcs[:] = [0] * len(specs)
    for chunk in chunks:
        i = chunk.tensor
        crcs[i] = zlib.crc32(chunk.data, crcs[i])
        if chunk.offset + len(chunk.data) == specs[i].nbytes:
            chunk = dataclasses.replace(chunk, checksum=crcs[i])
        yield chunk


class ModelChecksums:
    """The CRC-32s of one round's global model, computed while its first download
    streams and reused for every other site's: one pass over the model per round, not
    one per site. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._round: int | None = None
        self._crcs: tuple[int, ...] = ()

    def stamp(
        self, round: int, specs: tuple[TensorSpec, ...], chunks: Iterable[Chunk]
    ) -> Iterator[Chunk]:
        with self._lock:
            known = self._crcs if self._round == round else None
        if known is None:
            crcs: list[int] = []
            yield from stamp(specs, chunks, crcs)
            with self._lock:
                self._round, self._crcs = round, tuple(crcs)
            return
        for chunk in chunks:
            if chunk.offset + len(chunk.data) == specs[chunk.tensor].nbytes:
                chunk = dataclasses.replace(chunk, checksum=known[chunk.tensor])
            yield chunk


def verified(specs: tuple[TensorSpec, ...], chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """``chunks``, each tensor's last one passed on only with the right CRC-32 of the
    bytes before it. Raises :class:`UpdateRejected` naming the tensor otherwise. Order,
    sizes and completeness are the consumer's checks (:func:`~fedloom.transport.assemble`,
    the aggregator's accumulator)."""
    crcs = [0] * len(specs)
    for chunk in chunks:
        i = chunk.tensor
        if not 0 <= i < len(specs):
            raise UpdateRejected(f"chunk for tensor #{i}, but only {len(specs)} exist")
        crcs[i] = zlib.crc32(chunk.data, crcs[i])
        if chunk.offset + len(chunk.data) == specs[i].nbytes:
            if chunk.checksum != crcs[i]:
                sent = "none" if chunk.checksum is None else f"{chunk.checksum:#010x}"
                raise UpdateRejected(
                    f"tensor {specs[i].name!r}: checksum mismatch (sent {sent}, "
                    f"the received bytes give {crcs[i]:#010x})"
                )
        yield chunk
