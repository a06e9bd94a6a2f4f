"""Messages between the simulation and its workers, without pickle.

A message is a JSON header, which describes each tensor by name, dtype and shape,
followed by one raw buffer per tensor. Over a worker process's socket each part is
sent with ``Connection.send_bytes`` (:func:`send`, :func:`receive`); to a Ray actor the
parts go as one ``bytes`` object (:func:`pack`, :func:`unpack`). Either way arrays go
across as their bytes and come back through ``np.frombuffer``; nothing is ever
unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from fedloom.core.weights import Weights, dtype_from_name, dtype_name

Header = dict[str, Any]

_LENGTH = 8  # bytes of the header's length at the start of a packed message
_ALIGN = 8  # each part of a packed message starts at a multiple of this


def _head(header: Header, weights: Weights | None) -> bytes:
    tensors = None
    if weights is not None:
        tensors = [[k, dtype_name(v.dtype), list(v.shape)] for k, v in weights.items()]
    return json.dumps({**header, "tensors": tensors}).encode()


def _buffers(weights: Weights | None) -> Iterable[memoryview]:
    for array in (weights or {}).values():
        yield np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _parse(head: bytes) -> tuple[Header, list[tuple[str, np.dtype, list[int]]] | None]:
    header: Header = json.loads(head)
    tensors = header.pop("tensors", None)
    if tensors is None:
        return header, None
    return header, [(name, dtype_from_name(dtype), shape) for name, dtype, shape in tensors]


def send(conn: Connection, header: Header, weights: Weights | None = None) -> None:
    conn.send_bytes(_head(header, weights))
    for buf in _buffers(weights):
        conn.send_bytes(buf)


def receive(conn: Connection) -> tuple[Header, Weights | None]:
    header, tensors = _parse(conn.recv_bytes())
    if tensors is None:
        return header, None
    weights: Weights = {}
    for name, dtype, shape in tensors:
        array = np.empty(shape, dtype=dtype)
        _receive_into(conn, array.reshape(-1).view(np.uint8).data)
        array.flags.writeable = False  # as np.frombuffer(bytes) would be
        weights[name] = array
    return header, weights


def _receive_into(conn: Connection, into: memoryview) -> None:
    """Read one ``send_bytes`` message straight into ``into``, which it must fill.

    ``Connection.recv_bytes`` gathers a message through a BytesIO, copying it twice;
    this reads the same framing (a 4-byte big-endian length, or -1 and an 8-byte one)
    from the descriptor into the array: one copy, from the kernel."""
    fd = conn.fileno()
    (size,) = struct.unpack("!i", _read_exact(fd, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _read_exact(fd, 8))
    if size != len(into):
        raise OSError(f"a tensor of {size} bytes where {len(into)} were announced")
    got = 0
    while got < size:
        n = os.readv(fd, [into[got:]])
        if n == 0:
            raise EOFError("the other end closed the pipe in the middle of a tensor")
        got += n


def _read_exact(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = os.read(fd, size - len(data))
        if not part:
            raise EOFError("the other end closed the pipe")
        data += part
    return data


def _padding(size: int) -> int:
    return -size % _ALIGN


def pack(header: Header, weights: Weights | None = None) -> bytes:
    """One message as one ``bytes``: the header's length (8 bytes, little-endian), the
    header, then each tensor's raw bytes; each part starts at a multiple of 8 bytes, so
    every array :func:`unpack` returns is aligned."""
    head = _head(header, weights)
    head += b" " * _padding(_LENGTH + len(head))  # JSON allows trailing whitespace
    parts: list[bytes | memoryview] = [len(head).to_bytes(_LENGTH, "little"), head]
    for buf in _buffers(weights):
        parts += [buf, bytes(_padding(buf.nbytes))]
    return b"".join(parts)


def unpack(data: bytes) -> tuple[Header, Weights | None]:
    """The inverse of :func:`pack`; the arrays are read-only views of ``data``. Raises
    ``ValueError`` for a message cut short or with bytes past its last tensor."""
    view = memoryview(data)
    end = _LENGTH + int.from_bytes(view[:_LENGTH], "little")
    if len(view) < end:
        raise ValueError(f"message cut short: {len(view)} bytes, its header alone needs {end}")
    header, tensors = _parse(bytes(view[_LENGTH:end]))
    weights: Weights = {}
    for name, dtype, shape in tensors or ():
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if len(view) < end + nbytes:
            raise ValueError(f"message cut short in tensor {name!r}")
        weights[name] = np.frombuffer(view, dtype=dtype, count=count, offset=end).reshape(shape)
        end += nbytes + _padding(nbytes)
    if end != len(view):
        raise ValueError(f"message has {len(view) - end} bytes past its last tensor")
    return header, (None if tensors is None else weights)
