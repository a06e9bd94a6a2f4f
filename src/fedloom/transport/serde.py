"""Messages to and from bytes: the one module that meets protobuf (never grpc).

Paired ``x_to_proto`` / ``x_from_proto`` functions, and ``encode`` / ``decode`` for
whole messages. Decoding is strict: a garbled message raises
:class:`~fedloom.errors.TransportError` naming what was wrong.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from fedloom.errors import TransportError, UpdateRejected
from fedloom.records import Instruction, InstructionKind, TrainSettings
from fedloom.transport.messages import (
    Chunk,
    FailureReport,
    ModelHeader,
    PhaseMessage,
    Receipt,
    UpdateHeader,
)
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.weights import TensorSpec, dtype_from_name, dtype_name

_KIND_TO_PROTO = {
    InstructionKind.TRAIN: pb.INSTRUCTION_KIND_TRAIN,
    InstructionKind.EVALUATE: pb.INSTRUCTION_KIND_EVALUATE,
    InstructionKind.FINISHED: pb.INSTRUCTION_KIND_FINISHED,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}


def spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape))


def spec_from_proto(msg: pb.TensorSpec) -> TensorSpec:
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise UpdateRejected(f"tensor {msg.name!r} has a negative dimension {shape}")
    if dtype_name(dtype_from_name(msg.dtype)) != msg.dtype:  # raises on unknown dtypes
        raise UpdateRejected(
            f"tensor {msg.name!r}: write its dtype as {dtype_name(dtype_from_name(msg.dtype))!r}"
        )
    return TensorSpec(msg.name, msg.dtype, shape)


def settings_to_proto(s: TrainSettings) -> pb.TrainSettings:
    return pb.TrainSettings(**{k: getattr(s, k) for k in TrainSettings.__slots__})


def settings_from_proto(m: pb.TrainSettings) -> TrainSettings:
    return TrainSettings(**{k: getattr(m, k) for k in TrainSettings.__slots__})


def instruction_to_proto(task: Instruction) -> pb.Instruction:
    return pb.Instruction(
        round=task.round,
        kind=_KIND_TO_PROTO[task.kind],
        settings=settings_to_proto(task.settings),
        config_json=json.dumps(dict(task.config), sort_keys=True),
        phases=list(task.phases),
    )


def instruction_from_proto(m: pb.Instruction) -> Instruction:
    if m.kind not in _KIND_FROM_PROTO:
        raise TransportError(f"unknown task kind {m.kind}")
    try:
        config = json.loads(m.config_json) if m.config_json else {}
    except ValueError as err:
        raise TransportError(f"instruction config is not JSON: {err}") from err
    if not isinstance(config, dict):
        raise TransportError(
            f"instruction config must be a JSON object, got {type(config).__name__}"
        )
    return Instruction(
        round=m.round,
        kind=_KIND_FROM_PROTO[m.kind],
        settings=settings_from_proto(m.settings),
        config=config,
        phases=tuple(m.phases),
    )


def model_header_to_proto(h: ModelHeader) -> pb.ModelHeader:
    return pb.ModelHeader(round=h.round, tensors=[spec_to_proto(s) for s in h.tensors])


def model_header_from_proto(m: pb.ModelHeader) -> ModelHeader:
    return ModelHeader(round=m.round, tensors=tuple(spec_from_proto(s) for s in m.tensors))


def chunk_to_proto(c: Chunk) -> pb.Chunk:
    return pb.Chunk(tensor=c.tensor, offset=c.offset, data=bytes(c.data), checksum=c.checksum)


def chunk_from_proto(m: pb.Chunk) -> Chunk:
    checksum = m.checksum if m.HasField("checksum") else None
    return Chunk(tensor=m.tensor, offset=m.offset, data=m.data, checksum=checksum)


def update_header_to_proto(h: UpdateHeader) -> pb.UpdateHeader:
    return pb.UpdateHeader(
        round=h.round,
        num_samples=h.num_samples,
        metrics={k: float(v) for k, v in h.metrics.items()},
        tensors=[spec_to_proto(s) for s in h.tensors],
    )


def update_header_from_proto(m: pb.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        round=m.round,
        num_samples=m.num_samples,
        tensors=tuple(spec_from_proto(s) for s in m.tensors),
        metrics=dict(m.metrics),
    )


def receipt_to_proto(r: Receipt) -> pb.Receipt:
    return pb.Receipt(
        round=r.round, accepted=r.accepted, reason=r.reason, bytes_received=r.bytes_received
    )


def receipt_from_proto(m: pb.Receipt) -> Receipt:
    return Receipt(m.round, m.accepted, m.reason, m.bytes_received)


def failure_to_proto(f: FailureReport) -> pb.FailureReport:
    return pb.FailureReport(round=f.round, reason=f.reason)


def failure_from_proto(m: pb.FailureReport) -> FailureReport:
    return FailureReport(m.round, m.reason)


def phase_to_proto(m: PhaseMessage) -> pb.PhaseMessage:
    return pb.PhaseMessage(round=m.round, phase=m.phase, payload=bytes(m.payload))


def phase_from_proto(m: pb.PhaseMessage) -> PhaseMessage:
    return PhaseMessage(m.round, m.phase, m.payload)


_CODECS: dict[type, tuple[Any, Any, type[Message]]] = {
    Instruction: (instruction_to_proto, instruction_from_proto, pb.Instruction),
    ModelHeader: (model_header_to_proto, model_header_from_proto, pb.ModelHeader),
    Chunk: (chunk_to_proto, chunk_from_proto, pb.Chunk),
    UpdateHeader: (update_header_to_proto, update_header_from_proto, pb.UpdateHeader),
    Receipt: (receipt_to_proto, receipt_from_proto, pb.Receipt),
    FailureReport: (failure_to_proto, failure_from_proto, pb.FailureReport),
    PhaseMessage: (phase_to_proto, phase_from_proto, pb.PhaseMessage),
}

M = TypeVar("M")


def encode(message: object) -> bytes:
    """The protobuf bytes of a domain message."""
    to_proto = _CODECS[type(message)][0]
    try:
        data: bytes = to_proto(message).SerializeToString()
    except (ValueError, TypeError) as err:  # protobuf's range and type checks
        raise TransportError(f"cannot encode {type(message).__name__}: {err}") from err
    return data


def decode(kind: type[M], data: bytes) -> M:
    """The domain message of type ``kind`` held in ``data``."""
    _, from_proto, proto_type = _CODECS[kind]
    msg = proto_type()
    try:
        msg.ParseFromString(data)
    except DecodeError as err:
        raise TransportError(f"cannot decode {kind.__name__}: {err}") from err
    result: M = from_proto(msg)
    return result
