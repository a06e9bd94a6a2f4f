"""Fixed-point encoding of updates for secure aggregation: floats into the ring 2**bits.

A site clips each coordinate of its update to ``[-clip_range, clip_range]``, multiplies
it by its aggregation weight and by ``2**frac`` and rounds it to the nearest integer
(ties to even), kept modulo ``2**bits`` (two's complement). Sums of such integers wrap
around exactly as the masks do, so masks cancel and the unmasked sum, read back as a
signed integer and divided by ``2**frac``, is the weighted sum of the clipped updates.

**Exact encoding.** The rounding is exact: the integer is the one nearest to the real
product ``clip(x) * weight * 2**frac`` of the float64 value ``x``, not to its float64
approximation. (At 64 bits a product may need 62 bits and a float64 holds 53: rounding
the float64 product would be off by up to 256 units of the last fractional bit.)
The product is split into two float64 numbers whose sum is exact (Dekker's
two-product), and the rounding is decided from both. So each site's integer is off by
at most half a unit, ``2**-(frac + 1)``, at both widths, and the integer sum of
``sites`` updates is off by at most ``sites * 2**-(frac + 1)`` from the weighted sum
of the clipped updates; adding and unmasking integers adds nothing.

**What decoding adds.** :func:`decode` reads the integer sum as float64 and divides it
by ``2**frac``: exact at 32 bits, one float64 rounding (relative ``2**-53``) at 64
bits, where the sum may have more than 53 significant bits. Dividing by the total
weight ``W`` rounds once more, so a coordinate of the decoded mean is off by at most
``sites * 2**-(frac + 1) / W + 2**-51 * |mean|`` (:func:`mean_error_bound`).

**Range.** ``frac`` is chosen so that no sum of a round can overflow: at most ``sites``
values, each at most ``max_weight * clip_range`` in magnitude, must stay below
``2**(bits - 1)``. Rounding is monotonic and symmetric, so an honest site's integer
lies within ``+/-encode(clip_range)`` for its weight, and an honest sum within the sum of
those: :func:`honest_limit`, the exact bound the aggregator checks the unmasked sum
against (:func:`sum_problem`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

MIN_FRACTIONAL_BITS = 8
_SPLITTER = float(2**27 + 1)  # Veltkamp's constant: splits a float64 into two halves
_BLOCK = 1 << 15  # elements encoded at a time: the temporaries stay small


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


def _signed(bits: int) -> np.dtype:
    return np.dtype(np.int32 if bits == 32 else np.int64)


def encode(
    values: np.ndarray, *, weight: float, clip_range: float, frac: int, bits: int
) -> np.ndarray:
    """``round(clip(values) * weight * 2**frac)`` modulo ``2**bits``, flat, unsigned.

    The rounding (to nearest, ties to even) is of the exact real product, not of its
    float64 approximation; see the module's docstring."""
    flat = np.asarray(values).reshape(-1)
    scale = float(weight) * 2.0**frac  # exact: a power of two times a float64
    out = np.empty(flat.size, dtype=np.int64)
    narrow = _exact_in_float64(flat.dtype, weight)
    if narrow:  # what a clipped coordinate encodes to (its product may not be exact)
        top = _limit(clip_range, scale)
    for start in range(0, flat.size, _BLOCK):
        x = flat[start : start + _BLOCK].astype(np.float64)  # exact from any float dtype
        block = out[start : start + x.size]
        if not narrow:
            np.clip(x, -clip_range, clip_range, out=x)
            block[...] = _round_product(x, scale)
            continue
        beyond = np.abs(x) >= clip_range
        negative = np.signbit(x)
        np.clip(x, -clip_range, clip_range, out=x)  # beyond: replaced by +/-top below
        x *= scale  # exact where not beyond: no rounding, so rint rounds the exact product
        np.rint(x, out=x)
        np.copyto(block, x, casting="unsafe")
        if beyond.any():
            block[beyond] = np.where(negative[beyond], -top, top)
    as_unsigned = out.view(np.uint64)
    return as_unsigned if bits == 64 else as_unsigned.astype(np.uint32)


_SIGNIFICAND_BITS = {np.dtype(np.float32): 24, np.dtype(np.float16): 11}


def _exact_in_float64(dtype: np.dtype, weight: float) -> bool:
    """Whether every ``value * weight`` is exact in float64 for values of ``dtype``: a
    float32 or float16 value times a whole weight that fits in the bits to spare (below
    ``2**29`` for float32, the usual case: a model's update and a sample count)."""
    bits = _SIGNIFICAND_BITS.get(dtype)
    if bits is None or not float(weight).is_integer():
        return False
    return bool(0 <= weight < 2 ** (53 - bits))


def _split(a: np.ndarray | float) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Veltkamp's split: ``a == hi + lo`` exactly, each half at most 26 bits wide."""
    c = a * _SPLITTER
    hi = c - (c - a)
    return hi, a - hi


def _round_product(x: np.ndarray, scale: float) -> np.ndarray:
    """The int64 nearest (ties to even) to the exact product ``x * scale``.

    ``p + e == x * scale`` exactly (Dekker's two-product; exact while nothing
    overflows, and where ``p`` is too small for that to hold it is far below 1/2, so
    the result is 0 whatever ``e``). Then ``p = r + d`` and ``e = q + f`` with ``r``,
    ``q`` integers and ``|d|, |f| <= 1/2`` (all exact), and the rounding of ``d + f``,
    in ``[-1, 1]``, is decided by the signs of ``(d -/+ 1/2) + f``, which float64
    addition gets right (its rounding never changes a sign, nor makes a sum zero)."""
    p = x * scale
    xh, xl = _split(x)
    sh, sl = _split(scale)
    e = xl * sl - (((p - xh * sh) - xl * sh) - xh * sl)
    r = np.rint(p)
    d = p - r
    q = np.rint(e)
    f = e - q
    above = (d - 0.5) + f  # sign of (d + f) - 1/2
    below = (d + 0.5) + f  # sign of (d + f) + 1/2
    n = r.astype(np.int64)
    n += q.astype(np.int64)
    odd = (n & 1).astype(bool)
    n += (above > 0) | ((above == 0) & odd)  # past the half way up, or a tie to even
    n -= (below < 0) | ((below == 0) & odd)
    return n


def decode(total: np.ndarray, *, frac: int, bits: int) -> np.ndarray:
    """The signed value of a sum modulo ``2**bits``, divided by ``2**frac`` (float64)."""
    signed = np.asarray(total, dtype=unsigned(bits)).view(_signed(bits))
    return signed.astype(np.float64) / 2.0**frac


def honest_limit(weights: Iterable[float], *, clip_range: float, frac: int) -> int:
    """The largest magnitude a coordinate of an honest sum can have: the sum, over the
    sites, of the integer that ``clip_range`` encodes to at each site's weight. Exact:
    every honest coordinate lies within it, and nothing else does, with no slack."""
    return sum(_limit(clip_range, float(w) * 2.0**frac) for w in weights)


def _limit(clip_range: float, scale: float) -> int:
    """The integer ``clip_range`` encodes to (every clipped coordinate's magnitude)."""
    return int(_round_product(np.array([float(clip_range)]), scale)[0])


def peak(total: np.ndarray, bits: int) -> int:
    """The largest magnitude of the signed values of a sum modulo ``2**bits`` (0 if
    empty), as a Python integer (no overflow at ``-2**(bits - 1)``)."""
    signed = np.asarray(total, dtype=unsigned(bits)).view(_signed(bits))
    if not signed.size:
        return 0
    return max(int(signed.max()), -int(signed.min()))


def sum_problem(
    sums: Sequence[np.ndarray],
    weights: Iterable[float],
    *,
    clip_range: float,
    frac: int,
    bits: int,
) -> str | None:
    """Why these unmasked sums (unsigned, modulo ``2**bits``) cannot be the sum of honest
    sites of these weights, or None: a coordinate beyond :func:`honest_limit`. Masks that
    did not cancel (a site that changed its keys, garbage from a broken site) give
    uniformly random values, each in range with probability at most 1/2."""
    limit = honest_limit(weights, clip_range=clip_range, frac=frac)
    worst = max((peak(s, bits) for s in sums), default=0)
    if worst <= limit:
        return None
    scale = 2.0**frac
    return (
        f"the unmasked sum is out of range (a coordinate reaches {worst / scale:.6g}, "
        f"beyond {limit / scale:.6g}, the most that sites of these weights could send "
        f"with clip_range {clip_range:g})"
    )


def mean_error_bound(sites: int, total_weight: float, frac: int, mean: float) -> float:
    """The most a coordinate of the decoded mean, ``mean``, can be off from the weighted
    mean of the clipped updates: ``sites`` roundings of half a unit of ``2**-frac``,
    over the total weight, plus two float64 roundings (reading the integer sum,
    dividing it by the weight), together less than ``2**-51 * |mean|``."""
    return sites * 2.0 ** -(frac + 1) / total_weight + 2.0**-51 * abs(mean)
