"""The hot path of the wire format: a stream message holding one :class:`Chunk`, written
and read by hand.

A model streams as thousands of ``DownloadMessage`` / ``UploadMessage`` envelopes whose
only field is ``chunk`` (field 2 in both). Building one through the protobuf classes
copies the tensor bytes three times; here the envelope is written around them in one
join, and read as a zero-copy view into the received message. The bytes are exactly
the ones protobuf writes (fields in number order, proto3 defaults omitted, ``checksum``
present when set), and anything this reader does not recognise is left to protobuf's
own parser (:func:`read_chunk` returns ``None``), which validates it.
"""

from __future__ import annotations

from fedloom.transport.messages import Chunk

_ENVELOPE_CHUNK = 0x12  # field 2 (chunk), length-delimited
_TENSOR = 0x08  # Chunk.tensor: field 1, varint
_OFFSET = 0x10  # Chunk.offset: field 2, varint
_DATA = 0x1A  # Chunk.data: field 3, length-delimited
_CHECKSUM = 0x20  # Chunk.checksum: field 4, varint
_MAX_VARINT = 10


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def write_chunk(chunk: Chunk) -> bytes:
    """The stream message holding ``chunk``, as protobuf would write it."""
    head = bytearray()
    if chunk.tensor:
        head += bytes([_TENSOR]) + _varint(chunk.tensor)
    if chunk.offset:
        head += bytes([_OFFSET]) + _varint(chunk.offset)
    size = len(chunk.data)
    if size:
        head += bytes([_DATA]) + _varint(size)
    tail = b"" if chunk.checksum is None else bytes([_CHECKSUM]) + _varint(chunk.checksum)
    inner = len(head) + size + len(tail)
    return b"".join((bytes([_ENVELOPE_CHUNK]), _varint(inner), head, chunk.data, tail))


def _read_varint(view: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(at, min(at + _MAX_VARINT, len(view))):
        byte = view[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("bad varint")


def read_chunk(data: bytes) -> Chunk | None:
    """The chunk in a stream message, its data a view into ``data``; ``None`` when the
    message is anything else (a header, an end, or bytes to be checked by protobuf)."""
    view = memoryview(data)
    try:
        if not view or view[0] != _ENVELOPE_CHUNK:
            return None
        inner, at = _read_varint(view, 1)
        if at + inner != len(view):
            return None
        tensor = offset = 0
        checksum: int | None = None
        payload = view[0:0]
        while at < len(view):
            tag = view[at]
            if tag == _DATA:
                size, at = _read_varint(view, at + 1)
                if at + size > len(view):
                    return None
                payload, at = view[at : at + size], at + size
            elif tag in (_TENSOR, _OFFSET, _CHECKSUM):
                value, at = _read_varint(view, at + 1)
                if tag == _TENSOR:
                    tensor = value
                elif tag == _OFFSET:
                    offset = value
                else:
                    checksum = value
            else:
                return None
    except ValueError:
        return None
    if tensor >= 2**32 or offset >= 2**64 or (checksum is not None and checksum >= 2**32):
        return None  # out of the fields' range: protobuf's parser says what is wrong
    return Chunk(tensor, offset, payload, checksum)
