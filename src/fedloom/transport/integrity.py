"""A CRC-32 per tensor on a chunk stream: stamped by the sender, checked by the receiver.

TLS already protects the bytes on the wire; the checksum catches what TLS cannot: a
sender whose chunking or buffering went wrong, or a stream reassembled out of order.
The last chunk of each tensor carries the CRC-32 of the whole tensor's bytes.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable, Iterator

from fedloom.errors import UpdateRejected
from fedloom.transport.messages import Chunk
from fedloom.weights import TensorSpec


def stamp(specs: tuple[TensorSpec, ...], chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """``chunks`` with the tensor's CRC-32 set on each tensor's last chunk."""
    crcs = [0] * len(specs)
    for chunk in chunks:
        i = chunk.tensor
        crcs[i] = zlib.crc32(chunk.data, crcs[i])
        if chunk.offset + len(chunk.data) == specs[i].nbytes:
            chunk = dataclasses.replace(chunk, checksum=crcs[i])
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
