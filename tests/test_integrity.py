"""Per-tensor CRC-32 on chunk streams: :func:`integrity.stamp` and :func:`integrity.verified`.

The checksum is the transport's check: the sender stamps each tensor's last chunk, the
receiver passes the chunks on only while they verify. Order, sizes and completeness are
checked further on (by :func:`~fedloom.transport.assemble` or the accumulator).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest

from fedloom.core.errors import UpdateRejected
from fedloom.core.weights import TensorSpec, Weights, specs_of, weights_equal
from fedloom.transport import Chunk, assemble, integrity, iter_chunks

SPEC = (TensorSpec("w", "float32", (4,)),)
DATA = np.arange(4, dtype=np.float32).tobytes()


def weights() -> Weights:
    """Several tensors: multi-chunk ones, an empty one, a 0-d one, a bfloat16 one."""
    rng = np.random.default_rng(3)
    return {
        "w": rng.normal(size=(5, 7)).astype(np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "d": rng.normal(size=(9,)),
        "h": rng.normal(size=(3,)).astype(ml_dtypes.bfloat16),
        "steps": np.array(7, dtype=np.int64),
        "after-empty": np.zeros((0,), np.int32),
    }


def received(chunks: list[Chunk]) -> list[tuple[int, int, bytes, int | None]]:
    return [(c.tensor, c.offset, bytes(c.data), c.checksum) for c in chunks]


def test_a_right_checksum_passes() -> None:
    chunks = [Chunk(0, 0, DATA[:8]), Chunk(0, 8, DATA[8:], zlib.crc32(DATA))]
    assert received(list(integrity.verified(SPEC, chunks))) == received(chunks)


def test_a_wrong_checksum_is_refused_naming_the_tensor() -> None:
    chunks = [Chunk(0, 0, DATA[:8]), Chunk(0, 8, DATA[8:], zlib.crc32(DATA) ^ 1)]
    with pytest.raises(UpdateRejected, match=r"tensor 'w': checksum mismatch \(sent 0x"):
        list(integrity.verified(SPEC, chunks))


def test_bytes_changed_on_the_way_are_refused_at_the_tensors_last_chunk() -> None:
    chunks = list(integrity.stamp(SPEC, [Chunk(0, 0, DATA[:8]), Chunk(0, 8, DATA[8:])]))
    chunks[0] = Chunk(0, 0, bytes(8))  # an earlier chunk, which carries no checksum
    passed: list[Chunk] = []
    with pytest.raises(UpdateRejected, match="tensor 'w': checksum mismatch") as info:
        for chunk in integrity.verified(SPEC, chunks):
            passed.append(chunk)
    assert f"the received bytes give {zlib.crc32(bytes(8) + DATA[8:]):#010x}" in str(info.value)
    assert received(passed) == received(chunks[:1])  # passed on as they came, up to the bad one


def test_a_missing_checksum_on_a_tensors_last_chunk_is_refused_naming_the_tensor() -> None:
    specs = (TensorSpec("w", "float32", (4,)), TensorSpec("b", "float32", (2,)))
    b = np.ones(2, np.float32).tobytes()
    chunks = [Chunk(0, 0, DATA[:8]), Chunk(0, 8, DATA[8:], zlib.crc32(DATA)), Chunk(1, 0, b)]
    with pytest.raises(UpdateRejected, match=r"tensor 'b': checksum mismatch \(sent none"):
        list(integrity.verified(specs, chunks))


def test_an_empty_tensor_needs_its_checksum_too() -> None:
    specs = (TensorSpec("empty", "float32", (0,)),)
    assert received(list(integrity.verified(specs, [Chunk(0, 0, b"", 0)]))) == [(0, 0, b"", 0)]
    with pytest.raises(UpdateRejected, match=r"tensor 'empty': checksum mismatch \(sent none"):
        list(integrity.verified(specs, [Chunk(0, 0, b"")]))


def test_a_chunk_for_an_unknown_tensor_is_refused() -> None:
    with pytest.raises(UpdateRejected, match="tensor #1, but only 1 exist"):
        list(integrity.verified(SPEC, [Chunk(1, 0, DATA)]))


@pytest.mark.parametrize("chunk_bytes", [1, 8, 12, 1 << 20])
def test_stamp_then_verified_round_trips(chunk_bytes: int) -> None:
    original = weights()
    specs = specs_of(original)
    sent = list(integrity.stamp(specs, iter_chunks(original, chunk_bytes)))

    # only each tensor's last chunk carries a checksum: the CRC-32 of all its bytes
    for chunk in sent:
        spec = specs[chunk.tensor]
        if chunk.offset + len(chunk.data) == spec.nbytes:
            whole = np.ascontiguousarray(original[spec.name]).tobytes()
            assert chunk.checksum == zlib.crc32(whole)
        else:
            assert chunk.checksum is None
    assert sum(c.checksum is not None for c in sent) == len(specs)
    if chunk_bytes < 36:
        assert len([c for c in sent if c.tensor == 0]) > 1  # 'w' takes several chunks

    arrived = list(integrity.verified(specs, iter(sent)))
    assert received(arrived) == received(sent)
    assert weights_equal(assemble(specs, arrived), original)


def test_verified_is_lazy() -> None:
    """It passes each chunk on as it comes: a stream is checked while it streams."""
    pulled: list[int] = []

    def source() -> Iterator[Chunk]:
        for chunk in integrity.stamp(SPEC, [Chunk(0, 0, DATA[:8]), Chunk(0, 8, DATA[8:])]):
            pulled.append(chunk.offset)
            yield chunk

    stream = integrity.verified(SPEC, source())
    assert pulled == []
    assert next(stream).offset == 0 and pulled == [0]
