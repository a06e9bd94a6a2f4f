"""The zstd codec's frames, as pure functions: a tensor's bytes, byte-shuffled, in one
zstd frame that states its size, and the checks a received frame must pass before it
is decoded back to the tensor's dtype and shape.
"""

from __future__ import annotations

import numpy as np
import zstandard

from fedloom.core.errors import UpdateRejected
from fedloom.core.weights import TensorSpec, dtype_from_name

ZSTD_LEVEL = 3


def zstd_encode(values: np.ndarray) -> np.ndarray:
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return np.frombuffer(compressor.compress(shuffle(values)), dtype=np.uint8)


def shuffle(values: np.ndarray) -> bytes:
    """The bytes grouped by their place in a value (all first bytes, then all second …):
    float bytes of like significance sit together, which zstd compresses far better."""
    flat = np.ascontiguousarray(values).reshape(-1)
    raw = flat.view(np.uint8)
    if flat.dtype.itemsize == 1:
        return raw.tobytes()
    return raw.reshape(-1, flat.dtype.itemsize).T.tobytes()


def zstd_decode(spec: TensorSpec, frame: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(frame, dtype=np.uint8).tobytes()
    where = f"tensor {spec.name!r}: its zstd frame"
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise UpdateRejected(f"{where} is not a zstd frame ({err})") from err
    if size != spec.nbytes:  # checked before anything is allocated
        raise UpdateRejected(f"{where} holds {size} bytes, the tensor {spec.nbytes}")
    reader = zstandard.ZstdDecompressor().decompressobj()
    try:
        raw = reader.decompress(data)
    except zstandard.ZstdError as err:
        raise UpdateRejected(f"{where} does not decompress ({err})") from err
    if not reader.eof or reader.unused_data or len(raw) != spec.nbytes:
        raise UpdateRejected(f"{where} is cut short or followed by other bytes")
    dtype = dtype_from_name(spec.dtype)
    if dtype.itemsize > 1:
        raw = np.frombuffer(raw, dtype=np.uint8).reshape(dtype.itemsize, -1).T.tobytes()
    return np.frombuffer(raw, dtype=dtype).reshape(spec.shape)


def zstd_bound(nbytes: int) -> int:
    """More than zstd's worst case for ``nbytes`` (ZSTD_compressBound plus room)."""
    return nbytes + (nbytes >> 8) + 1024
