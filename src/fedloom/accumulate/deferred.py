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

import bisect
from dataclasses import dataclass

import numpy as np

from fedloom.accumulate.limbs import decode_limbs, encode_limbs
from fedloom.accumulate.spool import Spool
from fedloom.core.weights import TensorSpec, dtype_from_name

DEFERRED_DTYPES = frozenset({"bfloat16", "float16"})
"""Tensors of these dtypes are summed when the round closes, from the spools."""
BLOCK = 1 << 20  # elements summed at once: 8 MiB of int64 and 8 MiB of float64


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


class KeptIndex:
    """The kept updates' segments, tensor by tensor, each update's sorted by their first
    element: the segments overlapping a block are found by bisection."""

    def __init__(self, kept: list[KeptUpdate], tensors: int) -> None:
        self.by_tensor: list[list[tuple[KeptUpdate, list[int], list[int]]]] = [
            [] for _ in range(tensors)
        ]
        for update in sorted(kept, key=lambda k: k.site):
            per: dict[int, list[tuple[int, int]]] = {}
            for tensor, first, piece in update.segments:
                per.setdefault(tensor, []).append((first, piece))
            for tensor, segments in per.items():
                segments.sort()
                firsts, pieces = [f for f, _ in segments], [p for _, p in segments]
                self.by_tensor[tensor].append((update, firsts, pieces))


def deferred_sums(
    spec: TensorSpec, tensor: int, index: KeptIndex, max_sites: int, start: int, stop: int
) -> np.ndarray:
    """The int64 sums of ``weight * value`` over every kept update, for elements
    ``[start, stop)`` of tensor number ``tensor``."""
    dtype = dtype_from_name(spec.dtype)
    size = dtype.itemsize
    sums = np.zeros(stop - start, dtype=np.int64)
    for update, firsts, pieces in index.by_tensor[tensor]:
        i = max(0, bisect.bisect_right(firsts, start) - 1)
        while i < len(firsts) and firsts[i] < stop:
            first, piece = firsts[i], pieces[i]
            i += 1
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
    spec: TensorSpec,
    tensor: int,
    index: KeptIndex,
    max_sites: int,
    weight: float,
    start: int,
    stop: int,
) -> np.ndarray:
    """Elements ``[start, stop)`` of the float32 weighted mean of tensor number
    ``tensor`` over the kept updates (flat), computed a :data:`BLOCK` at a time: the
    operations of :meth:`MeanAccumulator.summary` on the eager sums, element by element,
    so the same bits whichever range is asked for."""
    out = np.empty(stop - start, dtype=np.float32)
    for low in range(start, stop, BLOCK):
        high = min(stop, low + BLOCK)
        if weight:
            sums = deferred_sums(spec, tensor, index, max_sites, low, high)
            value = decode_limbs(spec, (sums,))
            del sums
            value /= weight
        else:
            value = np.zeros(high - low)
        out[low - start : high - start] = value.astype(np.float32)
    return out
