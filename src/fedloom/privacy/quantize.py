"""Fixed-point encoding of updates for secure aggregation: floats into the ring 2**bits.

A site clips each coordinate of its update to ``[-clip_range, clip_range]``, multiplies
it by its aggregation weight and by ``2**frac`` and rounds it to an integer, kept
modulo ``2**bits`` (two's complement). Sums of such integers wrap around exactly as
the masks do, so masks cancel and the unmasked sum, read back as a signed integer and
divided by ``2**frac``, is the weighted sum of the clipped updates.

``frac`` is chosen so that no sum of a round can overflow: at most ``sites`` values,
each at most ``max_weight * clip_range`` in magnitude, must stay below ``2**(bits - 1)``.
Each site's rounding is off by at most ``2**-(frac + 1)``, so a coordinate of the
weighted sum is off by at most ``sites * 2**-(frac + 1)`` and of the mean by that over
the total weight.
"""

from __future__ import annotations

import math

import numpy as np

MIN_FRACTIONAL_BITS = 8


def fractional_bits(bits: int, sites: int, max_weight: float, clip_range: float) -> int:
    """The fractional bits that keep a sum of ``sites`` values of magnitude at most
    ``max_weight * clip_range`` inside a signed ``bits``-bit integer (one bit spare)."""
    bound = max(1.0, sites * max_weight * clip_range)
    return bits - 2 - math.ceil(math.log2(bound))


def range_problem(bits: int, sites: int, max_weight: float, clip_range: float) -> str | None:
    """Why this encoding would be too coarse, or None."""
    frac = fractional_bits(bits, sites, max_weight, clip_range)
    if frac >= MIN_FRACTIONAL_BITS:
        return None
    return (
        f"privacy.secure_aggregation.bits: {bits} bits leave {frac} fractional bits for "
        f"{sites} sites of weight up to {max_weight:g} and clip_range {clip_range:g} "
        f"(at least {MIN_FRACTIONAL_BITS} are needed); use bits: 64, lower "
        "training.max_samples (the cap of a site's weight) or lower clip_range"
    )


def unsigned(bits: int) -> np.dtype:
    return np.dtype(np.uint32 if bits == 32 else np.uint64)


def encode(
    values: np.ndarray, *, weight: float, clip_range: float, frac: int, bits: int
) -> np.ndarray:
    """``round(clip(values) * weight * 2**frac)`` modulo ``2**bits``, flat, unsigned."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    scaled = np.clip(flat, -clip_range, clip_range) * (weight * 2.0**frac)
    as_int = np.rint(scaled).astype(np.int64).view(np.uint64)
    return as_int if bits == 64 else as_int.astype(np.uint32)


def decode(total: np.ndarray, *, frac: int, bits: int) -> np.ndarray:
    """The signed value of a sum modulo ``2**bits``, divided by ``2**frac`` (float64)."""
    signed = np.asarray(total, dtype=unsigned(bits)).view(np.int32 if bits == 32 else np.int64)
    return signed.astype(np.float64) / 2.0**frac
