"""The messages aggregator and collaborator exchange. Plain frozen dataclasses.

Domain types hold numpy arrays or byte views, never protobuf objects; :mod:`serde` is
the one module that meets protobuf. No message names its sender: identity comes from
the channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedloom.core.chunks import chunk_problem, missing_problem
from fedloom.core.weights import TensorSpec, Weights, dtype_from_name

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes ``[offset, offset + len(data))`` of tensor number ``tensor``. The last chunk
    of a tensor may carry the CRC-32 of the whole tensor's bytes (the gRPC transport
    always sets it and checks it on arrival)."""

    tensor: int
    offset: int
    data: bytes | memoryview
    checksum: int | None = None


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Ends an upload on the wire: ``chunks`` were sent. Without it, a stream that stops
    was cut off rather than finished."""

    chunks: int


@dataclass(frozen=True, slots=True)
class ModelHeader:
    """Announces the global model of ``round`` before its chunks."""

    round: int
    tensors: tuple[TensorSpec, ...]
    attempt_id: str = ""  # the task the model was published for
    # the aggregator's signature over the task, the specs and every byte of the model
    # (:func:`fedloom.privacy.signing.model_message`); empty when unsigned (simulation)
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class UpdateHeader:
    """Announces a site's update before its chunks: round, sample count, metrics."""

    round: int
    num_samples: int
    tensors: tuple[TensorSpec, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    attempt_id: str = ""  # the instruction's attempt id this update answers
    audit_hash: str = ""  # the hash of the site's audit record of this upload
    local_steps: int = 0  # the optimiser steps the site's training took (0: not reported)


@dataclass(frozen=True, slots=True)
class UploadReceipt:
    """The aggregator's answer to an upload; ``signature`` signs the site's audit record
    hash (:func:`fedloom.privacy.signing.receipt_message`) when the aggregator has a key."""

    round: int
    accepted: bool
    reason: str = ""
    bytes_received: int = 0
    signature: bytes = b""
    # the upload broke off and was rolled back: the site is still asked for the round and
    # may send its update again (a collaborator asks for work again and does)
    resend: bool = False


@dataclass(frozen=True, slots=True)
class FailureReport:
    """A site telling the aggregator its task failed for ``round``; or, with
    ``withdrawn``, that it withdraws from the federation (it cannot take part: its data
    does not fit the model …) and why, naming no round. Rounds then count the site as
    failed at once, until it says Hello again."""

    round: int
    reason: str
    attempt_id: str = ""
    withdrawn: bool = False


@dataclass(frozen=True, slots=True)
class ExchangeMessage:
    """One step of a multi-step round: ``payload`` for the handler of ``step``, or
    that handler's reply. The payload's format belongs to the step (secure
    aggregation's keys, shares …); the transport only carries it."""

    round: int
    step: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Hello:
    """A collaborator's first message on a channel: its protocol version, the hash of
    the plan it approved, and the name it was started under (checked against its
    certificate, never trusted on its own)."""

    protocol_version: int
    plan_hash: str
    site: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """The aggregator's answer to :class:`Hello`."""

    protocol_version: int
    federation: str
    rounds: int
    heartbeat_seconds: float
    certificate: bytes = b""  # the aggregator's certificate (PEM): checks its signatures


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A site's sign of life; ``round`` is the round it works on (0: waiting)."""

    round: int


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    open_round: int  # 0: no round open
    finished: bool


@dataclass(frozen=True)
class ModelStream:
    """A header and the chunks that follow it (a download)."""

    header: ModelHeader
    chunks: Iterator[Chunk]


def iter_chunks(weights: Weights, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    """Zero-copy chunks of every tensor, in order; an empty tensor still gets one chunk."""
    for index, array in enumerate(weights.values()):
        view = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
        size = len(view)
        if size == 0:
            yield Chunk(index, 0, b"")
            continue
        for start in range(0, size, chunk_bytes):
            yield Chunk(index, start, view[start : start + chunk_bytes])


def assemble(specs: tuple[TensorSpec, ...], chunks: Iterable[Chunk]) -> Weights:
    """Rebuild weights from chunks, checking every byte arrives once and in order.

    A tensor whose chunks are consecutive slices of one buffer (what the in-process
    transport hands over) becomes a read-only view of that buffer, with no copy; any
    other is copied together. Raises :class:`~fedloom.core.errors.UpdateRejected` on a
    truncated, overlong or out-of-order stream.
    """
    from fedloom.core.errors import UpdateRejected

    parts: list[list[memoryview]] = [[] for _ in specs]
    filled = [0] * len(specs)
    for chunk in chunks:
        data = memoryview(chunk.data).cast("B")
        problem = chunk_problem(specs, filled, chunk.tensor, chunk.offset, len(data))
        if problem is not None:
            raise UpdateRejected(problem)
        if len(data):
            parts[chunk.tensor].append(data)
        filled[chunk.tensor] = chunk.offset + len(data)
    problem = missing_problem(specs, filled)
    if problem is not None:
        raise UpdateRejected(problem)
    return {s.name: _joined(s, p) for s, p in zip(specs, parts, strict=True)}


def _joined(spec: TensorSpec, parts: list[memoryview]) -> np.ndarray:
    dtype = dtype_from_name(spec.dtype)
    flat = _one_buffer(parts)
    if flat is None:
        flat = np.empty(spec.nbytes, dtype=np.uint8)
        at = 0
        for part in parts:
            flat[at : at + len(part)] = np.frombuffer(part, dtype=np.uint8)
            at += len(part)
    array = flat.view(dtype).reshape(spec.shape)
    array.flags.writeable = False
    return array


def _one_buffer(parts: list[memoryview]) -> np.ndarray | None:
    """The bytes of ``parts`` as one view, when they lie one after another in the same
    buffer; None otherwise (or when there are none)."""
    if not parts or parts[0].obj is None:
        return None
    owner = parts[0].obj
    if len(parts) == 1 and isinstance(owner, np.ndarray) and len(parts[0]) == owner.nbytes:
        return owner.reshape(-1).view(np.uint8)  # the whole of one array: no address sums
    start = _address(parts[0])
    at = start
    for part in parts:
        if part.obj is not owner or _address(part) != at:
            return None
        at += len(part)
    try:
        whole = np.frombuffer(owner, dtype=np.uint8)  # type: ignore[call-overload]
    except (TypeError, ValueError):  # an owner numpy cannot read flat
        return None
    first = start - _address(memoryview(whole))
    if first < 0 or first + (at - start) > whole.size:
        return None
    found: np.ndarray = whole[first : first + (at - start)]
    return found


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])
