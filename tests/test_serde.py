"""The wire format: every message round-trips, garbage is refused, tensors survive chunking.

Only ``serde.encode`` / ``serde.decode``, ``iter_chunks`` and ``assemble`` are used: no
protobuf classes. Hand-written byte strings are protobuf wire format, annotated.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.errors import TaskError, TransportError, UpdateRejected
from fedloom.core.records import Ending, Instruction, InstructionKind, TrainSettings
from fedloom.core.weights import TensorSpec, Weights, specs_of, weights_equal
from fedloom.simulation import pipes
from fedloom.simulation.workerops import (
    WorkerOp,
    instruction_from_json,
    instruction_to_json,
    op_of,
    request,
)
from fedloom.transport import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    ModelHeader,
    UpdateHeader,
    UploadReceipt,
    assemble,
    iter_chunks,
    serde,
)

PROPERTY = settings(max_examples=60, deadline=None)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"]
specs = st.builds(
    TensorSpec,
    name=st.text(max_size=12),
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 2**40), max_size=4).map(tuple),
)
metrics = st.dictionaries(st.text(max_size=12), st.floats(allow_nan=False), max_size=6)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
train_settings = st.builds(
    TrainSettings,
    epochs=U32,
    batch_size=U32,
    lr=st.floats(allow_nan=False),
    momentum=st.floats(allow_nan=False),
    weight_decay=st.floats(allow_nan=False),
    proximal_mu=st.floats(allow_nan=False),
)


def roundtrip(message: object) -> object:
    return serde.decode(type(message), serde.encode(message))


# ------------------------------------------------------------------ round trips


def finished_or_not(kind: InstructionKind, ending: Ending, **fields: Any) -> Instruction:
    """An instruction of ``kind``; a finished one says how the federation ended."""
    finished = kind is InstructionKind.FINISHED
    return Instruction(kind=kind, ending=ending if finished else None, **fields)


instructions = st.builds(
    finished_or_not,
    round=U64,
    kind=st.sampled_from(list(InstructionKind)),
    settings=train_settings,
    config=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    exchange_steps=st.lists(st.text(max_size=8), max_size=3).map(tuple),
    attempt_id=st.text(max_size=12),
    privacy=st.dictionaries(st.text(max_size=6), json_values, max_size=2),
    ending=st.sampled_from(list(Ending)),
)


@PROPERTY
@given(instruction=instructions)
def test_instruction_roundtrips(instruction: Instruction) -> None:
    assert roundtrip(instruction) == instruction


@pytest.mark.parametrize("kind", list(InstructionKind))
def test_an_instruction_says_how_the_federation_ended_exactly_when_it_is_finished(
    kind: InstructionKind,
) -> None:
    finished = kind is InstructionKind.FINISHED
    wrong = Instruction(round=1, kind=kind, ending=None if finished else Ending.COMPLETED)
    with pytest.raises(TransportError, match="a finished instruction, and only it"):
        roundtrip(wrong)


@PROPERTY
@given(round=U64, step=st.text(max_size=12), payload=st.binary(max_size=200))
def test_exchange_message_roundtrips(round: int, step: str, payload: bytes) -> None:
    message = ExchangeMessage(round, step, payload)
    assert roundtrip(message) == message


@PROPERTY
@given(round=U64, tensors=st.lists(specs, max_size=5).map(tuple))
def test_model_header_roundtrips(round: int, tensors: tuple[TensorSpec, ...]) -> None:
    header = ModelHeader(round, tensors)
    assert roundtrip(header) == header


@PROPERTY
@given(round=U64, num_samples=U64, tensors=st.lists(specs, max_size=5).map(tuple), m=metrics)
def test_update_header_roundtrips(
    round: int, num_samples: int, tensors: tuple[TensorSpec, ...], m: dict[str, float]
) -> None:
    header = UpdateHeader(round, num_samples, tensors, m)
    back = roundtrip(header)
    assert back == header
    for key, value in m.items():  # not only equal: the same float, sign of zero included
        assert math.copysign(1.0, back.metrics[key]) == math.copysign(1.0, value)


def test_update_header_keeps_a_nan_metric() -> None:
    # the aggregator, not the wire, decides what a NaN metric means
    back = roundtrip(UpdateHeader(1, 2, (), {"loss": math.nan}))
    assert math.isnan(back.metrics["loss"])


@PROPERTY
@given(tensor=U32, offset=U64, data=st.binary(max_size=300))
def test_chunk_roundtrips(tensor: int, offset: int, data: bytes) -> None:
    chunk = Chunk(tensor, offset, data)
    back = roundtrip(chunk)
    assert back == chunk
    assert bytes(back.data) == data


def test_chunk_made_from_a_memoryview_roundtrips_as_its_bytes() -> None:
    array = np.arange(6, dtype=np.float32)
    (chunk,) = iter_chunks({"x": array})
    assert isinstance(chunk.data, memoryview)
    back = roundtrip(chunk)
    assert bytes(back.data) == array.tobytes()


@PROPERTY
@given(
    round=U64,
    accepted=st.booleans(),
    reason=st.text(max_size=40),
    received=U64,
    signature=st.binary(max_size=80),
    resend=st.booleans(),
)
def test_receipt_roundtrips(
    round: int, accepted: bool, reason: str, received: int, signature: bytes, resend: bool
) -> None:
    receipt = UploadReceipt(round, accepted, reason, received, signature, resend)
    assert roundtrip(receipt) == receipt


@PROPERTY
@given(round=U64, reason=st.text(max_size=80), withdrawn=st.booleans())
def test_failure_report_roundtrips(round: int, reason: str, withdrawn: bool) -> None:
    report = FailureReport(round, reason, withdrawn=withdrawn)
    assert roundtrip(report) == report


def test_a_failure_report_of_before_withdrawals_reads_as_a_failed_round() -> None:
    # what a collaborator without the withdrawn field sends: round 3, a reason, a task
    old = b"\x08\x03\x12\x03oom\x1a\x05run/3"
    assert serde.decode(FailureReport, old) == FailureReport(3, "oom", "run/3", False)
    withdrawal = serde.encode(FailureReport(0, "wrong width", withdrawn=True))
    assert withdrawal == b"\x12\x0bwrong width\x20\x01"  # field 4, a varint: true


# ---------------------------------------------------------------------- garbage

MESSAGE_TYPES = [
    Instruction,
    ModelHeader,
    Chunk,
    UpdateHeader,
    UploadReceipt,
    FailureReport,
    ExchangeMessage,
]
CORRUPT = {
    "bad-wire-type": b"\xff\xff\xff\xff",
    "tag-without-value": b"\x08",
    "length-past-the-end": b"\x1a\x05ab",  # field 3, 5 bytes announced, 2 present
    "endless-varint": b"\x80" * 11,
}


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("data", list(CORRUPT.values()), ids=list(CORRUPT))
def test_garbage_bytes_raise_transport_error(kind: type, data: bytes) -> None:
    with pytest.raises(TransportError, match=kind.__name__):
        serde.decode(kind, data)


BAD_UTF8 = {  # a string field holding the bytes ff fe, which are not UTF-8
    Instruction: b"\x22\x02\xff\xfe",  # config_json
    ModelHeader: b"\x12\x04\x0a\x02\xff\xfe",  # tensors[0].name
    UpdateHeader: b"\x1a\x04\x0a\x02\xff\xfe",  # a metrics key
    UploadReceipt: b"\x1a\x02\xff\xfe",  # reason
    FailureReport: b"\x12\x02\xff\xfe",  # reason
}


@pytest.mark.parametrize("kind", list(BAD_UTF8), ids=lambda t: t.__name__)
def test_invalid_utf8_raises_transport_error(kind: type) -> None:
    with pytest.raises(TransportError, match=kind.__name__):
        serde.decode(kind, BAD_UTF8[kind])


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "kind 0"),  # no kind at all
        (b"\x10\x09", "kind 9"),  # kind = 9: no such kind
        (b"\x10\x01\x22\x01{", "config"),  # kind TRAIN, config_json = "{"
        (b"\x10\x01\x22\x02[]", "config"),  # kind TRAIN, config_json = "[]": not an object
    ],
    ids=["missing-kind", "unknown-kind", "config-not-json", "config-not-an-object"],
)
def test_garbled_instruction_raises_transport_error(data: bytes, words: str) -> None:
    with pytest.raises(TransportError, match=words):
        serde.decode(Instruction, data)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (TensorSpec("w", "complex64", (2,)), "complex64"),
        (TensorSpec("w", "object", (2,)), "object"),
        (TensorSpec("w", "no-such-type", (2,)), "no-such-type"),
        (TensorSpec("w", "float32", (3, -2)), "negative dimension"),
    ],
    ids=["complex", "object", "unknown", "negative-dim"],
)
@pytest.mark.parametrize("header", ["update", "model"])
def test_header_with_an_impossible_tensor_is_refused(
    spec: TensorSpec, words: str, header: str
) -> None:
    message = UpdateHeader(1, 5, (spec,)) if header == "update" else ModelHeader(1, (spec,))
    data = serde.encode(message)  # encoding does not check: the receiver must
    with pytest.raises((TransportError, UpdateRejected), match=words):
        serde.decode(type(message), data)


@pytest.mark.parametrize(
    "message",
    [
        UpdateHeader(1, -1, ()),
        UploadReceipt(-1, True),
        Chunk(-1, 0, b""),
        Chunk(2**32, 0, b""),
    ],
    ids=["negative-samples", "negative-round", "negative-tensor", "tensor-past-u32"],
)
def test_unencodable_values_raise_transport_error(message: object) -> None:
    # serde is the one boundary with protobuf: its ValueError must not leak out
    with pytest.raises(TransportError):
        serde.encode(message)


# ---------------------------------------------------------- tensors through chunks


def odd_weights() -> Weights:
    """Every awkward case: bfloat16, float16, int64, 0-d, empty, and raw bit patterns
    (NaN payloads, negative zero, subnormals) that only a bit-exact path keeps."""
    rng = np.random.default_rng(5)

    def raw(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        data = rng.integers(0, 256, size=count, dtype=np.uint8).tobytes()
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()

    return {
        "bf16": raw(np.dtype(ml_dtypes.bfloat16), (3, 5)),
        "f16": raw(np.dtype(np.float16), (7,)),
        "i64": raw(np.dtype(np.int64), (2, 3)),
        "scalar": np.array(-0.0, dtype=np.float32),
        "scalar_i64": np.array(-(2**63), dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "f64": raw(np.dtype(np.float64), (3,)),
    }


def wire(weights: Weights, chunk_bytes: int) -> Weights:
    """Send ``weights`` as a model header and chunks through the wire format and rebuild."""
    header = serde.decode(ModelHeader, serde.encode(ModelHeader(3, specs_of(weights))))
    chunks = [serde.decode(Chunk, serde.encode(c)) for c in iter_chunks(weights, chunk_bytes)]
    return assemble(header.tensors, chunks)


@pytest.mark.parametrize("chunk_bytes", [1, 3, 8, 1 << 20])
def test_tensors_survive_the_wire_bit_identically(chunk_bytes: int) -> None:
    weights = odd_weights()
    chunks = list(iter_chunks(weights, chunk_bytes))
    for index, array in enumerate(weights.values()):
        mine = [c for c in chunks if c.tensor == index]
        assert all(0 < len(c.data) <= chunk_bytes for c in mine) or array.nbytes == 0
        assert len(mine) == max(1, math.ceil(array.nbytes / chunk_bytes))
    back = wire(weights, chunk_bytes)
    assert weights_equal(back, weights)
    assert back["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert back["scalar"].shape == () and back["empty"].shape == (0, 4)


@PROPERTY
@given(
    dtype=st.sampled_from(["bfloat16", "float16", "float32", "int64", "uint8"]),
    shape=st.lists(st.integers(0, 5), max_size=3).map(tuple),
    chunk_bytes=st.integers(1, 40),
    data=st.data(),
)
def test_any_bits_survive_the_wire(
    dtype: str, shape: tuple[int, ...], chunk_bytes: int, data: st.DataObject
) -> None:
    spec = TensorSpec("t", dtype, shape)
    raw = data.draw(st.binary(min_size=spec.nbytes, max_size=spec.nbytes))
    array = np.frombuffer(raw, dtype=np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else dtype)
    weights = {"t": array.reshape(shape), "after": np.array([7], dtype=np.int64)}
    back = wire(weights, chunk_bytes)
    assert weights_equal(back, weights)


# ------------------------------------------------------------- assemble refuses


def model() -> Weights:
    return {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(4, dtype=np.float32),
        "steps": np.array(3, dtype=np.int64),
    }


def stream(chunk_bytes: int = 8) -> list[Chunk]:
    return [Chunk(c.tensor, c.offset, bytes(c.data)) for c in iter_chunks(model(), chunk_bytes)]


def test_assemble_accepts_the_intact_stream() -> None:
    assert weights_equal(assemble(specs_of(model()), stream()), model())


def without(chunks: list[Chunk], tensor: int, which: int) -> list[Chunk]:
    mine = [c for c in chunks if c.tensor == tensor]
    return [c for c in chunks if c is not mine[which]]


def swapped(chunks: list[Chunk], tensor: int) -> list[Chunk]:
    out = list(chunks)
    i, j = [k for k, c in enumerate(out) if c.tensor == tensor][:2]
    out[i], out[j] = out[j], out[i]
    return out


BROKEN = {
    # truncated: the last chunk of "w" (middle tensor of the stream) is missing
    "truncated-middle": (lambda s: without(s, 0, -1), ["'w'", "ended early", "40 of 48"]),
    "truncated-last": (lambda s: without(s, 2, -1), ["'steps'", "ended early", "0 of 8"]),
    "tensor-missing": (lambda s: [c for c in s if c.tensor != 1], ["'b'", "0 of 16"]),
    "overlong": (lambda s: [*s, Chunk(1, 16, b"\x00")], ["'b'", "larger than announced"]),
    "overlong-chunk": (
        lambda s: [*without(s, 2, -1), Chunk(2, 0, b"\x00" * 9)],
        ["'steps'", "larger than announced"],
    ),
    "out-of-order": (lambda s: swapped(s, 0), ["'w'", "byte 8", "expected 0"]),
    "duplicate": (
        lambda s: [*s[:2], s[1], *s[2:]],
        ["'w'", "byte 8", "expected 16"],
    ),
    "unknown-tensor": (lambda s: [*s, Chunk(3, 0, b"\x00")], ["#3", "only 3"]),
    "negative-tensor": (lambda s: [Chunk(-1, 0, b"\x00"), *s], ["#-1"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_assemble_refuses_a_broken_stream_naming_the_tensor(case: str) -> None:
    break_it, words = BROKEN[case]
    with pytest.raises(UpdateRejected) as info:
        assemble(specs_of(model()), break_it(stream()))
    for word in words:
        assert word in info.value.message


# ------------------------------------------------- the hand-written chunk envelope

chunks = st.builds(
    Chunk,
    tensor=U32,
    offset=U64,
    data=st.binary(max_size=300),
    checksum=st.one_of(st.none(), U32),
)


@PROPERTY
@given(chunk=chunks)
def test_chunk_envelope_is_written_exactly_as_protobuf_writes_it(chunk: Chunk) -> None:
    from fedloom.transport.proto import fedloom_pb2 as pb

    wire = serde.encode_stream_item(chunk)
    for envelope in (pb.UploadMessage, pb.DownloadMessage):
        assert envelope(chunk=serde.chunk_to_proto(chunk)).SerializeToString() == wire
    for decode in (serde.decode_upload_item, serde.decode_download_item):
        back = decode(wire)
        assert isinstance(back, Chunk)
        assert (back.tensor, back.offset, bytes(back.data), back.checksum) == (
            chunk.tensor,
            chunk.offset,
            bytes(chunk.data),
            chunk.checksum,
        )


@PROPERTY
@given(chunk=chunks, cut=st.integers(1, 40))
def test_a_cut_or_garbled_chunk_envelope_never_decodes_wrongly(chunk: Chunk, cut: int) -> None:
    wire = serde.encode_stream_item(chunk)
    for garbled in (wire[:-cut], wire + b"\x07", b"\x12\xff" + wire[2:]):
        if garbled == wire:
            continue
        try:
            back = serde.decode_upload_item(garbled)
        except TransportError:
            continue  # refused: the right answer for garbage
        # whatever still parses must be what protobuf itself reads from those bytes
        from fedloom.transport.proto import fedloom_pb2 as pb

        msg = pb.UploadMessage()
        msg.ParseFromString(garbled)
        if isinstance(back, Chunk):
            assert msg.WhichOneof("body") == "chunk"
            assert (back.tensor, back.offset, bytes(back.data)) == (
                msg.chunk.tensor,
                msg.chunk.offset,
                msg.chunk.data,
            )


@PROPERTY
@given(instruction=instructions)
def test_an_instruction_crosses_to_a_worker_as_json_unchanged(instruction: Instruction) -> None:
    """What the simulation's workers get: a JSON object of the instruction's fields."""
    header, _ = pipes.unpack(
        pipes.pack(request(WorkerOp.RUN, sent=instruction_to_json(instruction)))
    )
    assert instruction_from_json(header["sent"]) == instruction


def test_a_worker_names_a_request_it_does_not_know() -> None:
    assert op_of(request(WorkerOp.RUN, key="k")) is WorkerOp.RUN
    with pytest.raises(TaskError, match="unknown worker request 'train'"):
        op_of({"op": "train"})
