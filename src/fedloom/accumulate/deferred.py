"""The mean of bfloat16 and float16 tensors, summed when the round closes rather than
as the updates stream in.

The eager sum keeps an int64 per value (:mod:`~fedloom.accumulate.limbs`): 4x the
bytes of a bfloat16 model, on top of the model. A narrow-float tensor's sums are not
kept at all: each update's bytes are only checked (finite, in range) and spooled as
they arrive (the spool every contribution writes for its rollback anyway), and when
the round closes the mean is computed one block of elements at a time from the
spools, with the very integers the eager sum adds (:func:`encode_limbs`, one limb, 32
fractional bits). Integer addition is exact and associative, so the mean is
bit-identical to the eager sum's whatever the arrival order, the chunking, or the
block size: the same order-independent result in O(block) memory instead of
O(model).

The mean itself is computed when a strategy reads it (:class:`LazyWeights`), tensor
by tensor, so a strategy that moves the model one tensor at a time never holds the
whole float32 mean either. An aborted update costs nothing to undo: its spool is
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.accumulate.limbs import decode_limbs, encode_limbs
from fedloom.accumulate.spool import Spool
from fedloom.core.weights import TensorSpec, dtype_from_name

DEFERRED_DTYPES = frozenset({"bfloat16", "float16"})
"""Tensors of these dtypes are summed when the round closes, from the spools."""
BLOCK = 1 << 22  # elements summed at once: 32 MiB of int64 and 32 MiB of float64


@dataclass
class KeptUpdate:
    """A committed update's spooled bytes: the segments of each tensor (tensor, first
    element, spool piece) and its aggregation weight."""

    site: str
    weight: int
    spool: Spool
    segments: list[tuple[int, int, int]]


def close_spools(kept: list[KeptUpdate]) -> None:
    """Close the kept updates' spools (their temporary files go)."""
    for update in kept:
        update.spool.close()


def deferred_sums(
    spec: TensorSpec,
    tensor: int,
    kept: list[KeptUpdate],
    max_sites: int,
    start: int,
    stop: int,
) -> np.ndarray:
    """The int64 sums of ``weight * value`` over every kept update, for elements
    ``[start, stop)`` of tensor number ``tensor``."""
    dtype = dtype_from_name(spec.dtype)
    size = dtype.itemsize
    sums = np.zeros(stop - start, dtype=np.int64)
    for update in kept:
        for index, first, piece in update.segments:
            if index != tensor:
                continue
            low = max(start, first)
            high = min(stop, first + update.spool.length(piece) // size)
            if low >= high:
                continue
            raw = update.spool.read_range(piece, (low - first) * size, (high - first) * size)
            values = np.frombuffer(raw, dtype=dtype)
            (q,) = encode_limbs(spec.name, 1, values, update.weight, max_sites)
            sums[low - start : high - start] += q
    return sums


def deferred_mean(
    spec: TensorSpec, tensor: int, kept: list[KeptUpdate], max_sites: int, weight: float
) -> np.ndarray:
    """The float32 weighted mean of tensor number ``tensor`` over the kept updates, block
    by block: the operations of :meth:`MeanAccumulator.summary` on the eager sums,
    element by element, so the same bits."""
    out = np.empty(spec.size, dtype=np.float32)
    for start in range(0, spec.size, BLOCK):
        stop = min(spec.size, start + BLOCK)
        if weight:
            sums = deferred_sums(spec, tensor, kept, max_sites, start, stop)
            value = decode_limbs(spec, (sums,))
            del sums
            value /= weight
        else:
            value = np.zeros(stop - start)
        out[start:stop] = value.astype(np.float32)
    return out.reshape(spec.shape)
