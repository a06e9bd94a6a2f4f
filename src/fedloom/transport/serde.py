"""Messages to and from bytes: the one module that meets protobuf (never grpc).

Paired ``x_to_proto`` / ``x_from_proto`` functions, and ``encode`` / ``decode`` for
whole messages. Decoding is strict: a garbled message raises
:class:`~fedloom.core.errors.TransportError` naming what was wrong.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar, cast

from google.protobuf.message import DecodeError, Message

from fedloom.core.errors import TransportError, UpdateRejected
from fedloom.core.records import Ending, Instruction, InstructionKind, TrainSettings
from fedloom.core.weights import TensorSpec, dtype_from_name, dtype_name
from fedloom.transport import chunkwire
from fedloom.transport.messages import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    Heartbeat,
    HeartbeatReply,
    Hello,
    ModelHeader,
    StreamEnd,
    UpdateHeader,
    UploadReceipt,
    Welcome,
)
from fedloom.transport.proto import fedloom_pb2 as pb

_KIND_TO_PROTO = {
    InstructionKind.TRAIN: pb.INSTRUCTION_KIND_TRAIN,
    InstructionKind.EVALUATE: pb.INSTRUCTION_KIND_EVALUATE,
    InstructionKind.FINISHED: pb.INSTRUCTION_KIND_FINISHED,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}
_ENDING_TO_PROTO = {
    None: pb.ENDING_UNSPECIFIED,
    Ending.COMPLETED: pb.ENDING_COMPLETED,
    Ending.STOPPED: pb.ENDING_STOPPED,
    Ending.CANCELLED: pb.ENDING_CANCELLED,
}
_ENDING_FROM_PROTO = {v: k for k, v in _ENDING_TO_PROTO.items()}


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


def instruction_to_proto(instruction: Instruction) -> pb.Instruction:
    return pb.Instruction(
        round=instruction.round,
        kind=_KIND_TO_PROTO[instruction.kind],
        settings=settings_to_proto(instruction.settings),
        config_json=json.dumps(dict(instruction.config), sort_keys=True),
        exchange_steps=list(instruction.exchange_steps),
        attempt_id=instruction.attempt_id,
        privacy_json=json.dumps(dict(instruction.privacy), sort_keys=True)
        if instruction.privacy
        else "",
        ending=_ENDING_TO_PROTO[instruction.ending],
    )


def instruction_from_proto(m: pb.Instruction) -> Instruction:
    if m.kind not in _KIND_FROM_PROTO:
        raise TransportError(f"unknown instruction kind {m.kind}")
    kind = _KIND_FROM_PROTO[m.kind]
    known = m.ending in _ENDING_FROM_PROTO
    ending = _ENDING_FROM_PROTO.get(m.ending)
    if not known or (ending is None) != (kind is not InstructionKind.FINISHED):
        raise TransportError(
            f"instruction of kind {kind.value} with ending {m.ending}: a finished "
            "instruction, and only it, says how the federation ended"
        )
    try:
        config = json.loads(m.config_json) if m.config_json else {}
    except ValueError as err:
        raise TransportError(f"instruction config is not JSON: {err}") from err
    if not isinstance(config, dict):
        raise TransportError(
            f"instruction config must be a JSON object, got {type(config).__name__}"
        )
    try:
        privacy = json.loads(m.privacy_json) if m.privacy_json else {}
    except ValueError as err:
        raise TransportError(f"instruction privacy is not JSON: {err}") from err
    if not isinstance(privacy, dict):
        raise TransportError("instruction privacy must be a JSON object")
    return Instruction(
        round=m.round,
        kind=kind,
        settings=settings_from_proto(m.settings),
        config=config,
        exchange_steps=tuple(m.exchange_steps),
        attempt_id=m.attempt_id,
        privacy=privacy,
        ending=ending,
    )


def model_header_to_proto(h: ModelHeader) -> pb.ModelHeader:
    return pb.ModelHeader(
        round=h.round,
        tensors=[spec_to_proto(s) for s in h.tensors],
        attempt_id=h.attempt_id,
        signature=h.signature,
    )


def model_header_from_proto(m: pb.ModelHeader) -> ModelHeader:
    return ModelHeader(
        round=m.round,
        tensors=tuple(spec_from_proto(s) for s in m.tensors),
        attempt_id=m.attempt_id,
        signature=m.signature,
    )


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
        attempt_id=h.attempt_id,
        audit_hash=h.audit_hash,
        local_steps=h.local_steps,
    )


def update_header_from_proto(m: pb.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        round=m.round,
        num_samples=m.num_samples,
        tensors=tuple(spec_from_proto(s) for s in m.tensors),
        metrics=dict(m.metrics),
        attempt_id=m.attempt_id,
        audit_hash=m.audit_hash,
        local_steps=m.local_steps,
    )


def receipt_to_proto(r: UploadReceipt) -> pb.UploadReceipt:
    return pb.UploadReceipt(
        round=r.round,
        accepted=r.accepted,
        reason=r.reason,
        bytes_received=r.bytes_received,
        signature=r.signature,
        resend=r.resend,
    )


def receipt_from_proto(m: pb.UploadReceipt) -> UploadReceipt:
    return UploadReceipt(m.round, m.accepted, m.reason, m.bytes_received, m.signature, m.resend)


def failure_to_proto(f: FailureReport) -> pb.FailureReport:
    return pb.FailureReport(
        round=f.round, reason=f.reason, attempt_id=f.attempt_id, withdrawn=f.withdrawn
    )


def failure_from_proto(m: pb.FailureReport) -> FailureReport:
    return FailureReport(m.round, m.reason, m.attempt_id, m.withdrawn)


def phase_to_proto(m: ExchangeMessage) -> pb.ExchangeMessage:
    return pb.ExchangeMessage(round=m.round, step=m.step, payload=bytes(m.payload))


def phase_from_proto(m: pb.ExchangeMessage) -> ExchangeMessage:
    return ExchangeMessage(m.round, m.step, m.payload)


def hello_to_proto(m: Hello) -> pb.Hello:
    return pb.Hello(protocol_version=m.protocol_version, plan_hash=m.plan_hash, site=m.site)


def hello_from_proto(m: pb.Hello) -> Hello:
    return Hello(m.protocol_version, m.plan_hash, m.site)


def welcome_to_proto(m: Welcome) -> pb.Welcome:
    return pb.Welcome(
        protocol_version=m.protocol_version,
        federation=m.federation,
        rounds=m.rounds,
        heartbeat_seconds=m.heartbeat_seconds,
        certificate=m.certificate,
    )


def welcome_from_proto(m: pb.Welcome) -> Welcome:
    return Welcome(m.protocol_version, m.federation, m.rounds, m.heartbeat_seconds, m.certificate)


def heartbeat_to_proto(m: Heartbeat) -> pb.Heartbeat:
    return pb.Heartbeat(round=m.round)


def heartbeat_from_proto(m: pb.Heartbeat) -> Heartbeat:
    return Heartbeat(m.round)


def heartbeat_reply_to_proto(m: HeartbeatReply) -> pb.HeartbeatReply:
    return pb.HeartbeatReply(open_round=m.open_round, finished=m.finished)


def heartbeat_reply_from_proto(m: pb.HeartbeatReply) -> HeartbeatReply:
    return HeartbeatReply(m.open_round, m.finished)


_CODECS: dict[type, tuple[Any, Any, type[Message]]] = {
    Instruction: (instruction_to_proto, instruction_from_proto, pb.Instruction),
    ModelHeader: (model_header_to_proto, model_header_from_proto, pb.ModelHeader),
    Chunk: (chunk_to_proto, chunk_from_proto, pb.Chunk),
    UpdateHeader: (update_header_to_proto, update_header_from_proto, pb.UpdateHeader),
    UploadReceipt: (receipt_to_proto, receipt_from_proto, pb.UploadReceipt),
    FailureReport: (failure_to_proto, failure_from_proto, pb.FailureReport),
    ExchangeMessage: (phase_to_proto, phase_from_proto, pb.ExchangeMessage),
    Hello: (hello_to_proto, hello_from_proto, pb.Hello),
    Welcome: (welcome_to_proto, welcome_from_proto, pb.Welcome),
    Heartbeat: (heartbeat_to_proto, heartbeat_from_proto, pb.Heartbeat),
    HeartbeatReply: (heartbeat_reply_to_proto, heartbeat_reply_from_proto, pb.HeartbeatReply),
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
    result: M = from_proto(_parse(proto_type, data, kind.__name__))
    return result


# ------------------------------------------------ gRPC envelopes (requests and streams)


def _parse(proto_type: type[Message], data: bytes, what: str) -> Any:
    msg = proto_type()
    try:
        msg.ParseFromString(data)
    except DecodeError as err:
        raise TransportError(f"cannot decode {what}: {err}") from err
    return msg


def encode_task_request(wait_seconds: float) -> bytes:
    data: bytes = pb.InstructionRequest(wait_seconds=wait_seconds).SerializeToString()
    return data


def decode_task_request(data: bytes) -> float:
    wait = float(_parse(pb.InstructionRequest, data, "InstructionRequest").wait_seconds)
    if not 0 <= wait <= 3600:
        raise TransportError(f"InstructionRequest.wait_seconds must be in [0, 3600], got {wait}")
    return wait


def encode_instruction_reply(task: Instruction | None) -> bytes:
    reply = (
        pb.InstructionReply()
        if task is None
        else pb.InstructionReply(instruction=instruction_to_proto(task))
    )
    data: bytes = reply.SerializeToString()
    return data


def decode_instruction_reply(data: bytes) -> Instruction | None:
    reply = _parse(pb.InstructionReply, data, "InstructionReply")
    return instruction_from_proto(reply.instruction) if reply.HasField("instruction") else None


def encode_download_request(round: int) -> bytes:
    data: bytes = pb.DownloadRequest(round=round).SerializeToString()
    return data


def decode_download_request(data: bytes) -> int:
    return int(_parse(pb.DownloadRequest, data, "DownloadRequest").round)


def encode_stream_item(item: ModelHeader | UpdateHeader | Chunk | StreamEnd) -> bytes:
    """A download (:class:`ModelHeader` or :class:`Chunk`) or upload (:class:`UpdateHeader`,
    :class:`Chunk`, :class:`StreamEnd`) stream message; a chunk is the same both ways."""
    if isinstance(item, Chunk):
        return chunkwire.write_chunk(item)  # the hot path: the same bytes, one copy
    if isinstance(item, StreamEnd):
        data: bytes = pb.UploadMessage(end=pb.StreamEnd(chunks=item.chunks)).SerializeToString()
    elif isinstance(item, ModelHeader):
        data = pb.DownloadMessage(header=model_header_to_proto(item)).SerializeToString()
    else:
        data = pb.UploadMessage(header=update_header_to_proto(item)).SerializeToString()
    return data


def decode_download_item(data: bytes) -> ModelHeader | Chunk:
    item = _decode_stream_item(pb.DownloadMessage, data)
    if isinstance(item, StreamEnd):
        raise TransportError("a download carries no StreamEnd")
    return cast(ModelHeader | Chunk, item)  # its envelope's header is a ModelHeader


def decode_upload_item(data: bytes) -> UpdateHeader | Chunk | StreamEnd:
    item = _decode_stream_item(pb.UploadMessage, data)
    return cast(UpdateHeader | Chunk | StreamEnd, item)  # its header is an UpdateHeader


def _decode_stream_item(
    envelope: type[Message], data: bytes
) -> ModelHeader | UpdateHeader | Chunk | StreamEnd:
    """A chunk through the hand-written hot path, anything else through protobuf."""
    chunk = chunkwire.read_chunk(data)
    if chunk is not None:
        return chunk
    msg = _parse(envelope, data, envelope.DESCRIPTOR.name)
    body = msg.WhichOneof("body")
    if body == "chunk":
        return chunk_from_proto(msg.chunk)
    if body == "header":
        header = msg.header
        if isinstance(header, pb.ModelHeader):
            return model_header_from_proto(header)
        return update_header_from_proto(header)
    if body == "end":
        return StreamEnd(int(msg.end.chunks))
    raise TransportError(f"empty {envelope.DESCRIPTOR.name}")
