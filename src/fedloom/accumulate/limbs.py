"""The fixed-point codec of the mean: a weighted value as int64 limbs, and back.

**Why fixed point.** Floating-point addition is not associative, so a float sum would
depend on the order in which sites (and their chunks) happen to arrive, and a resumed
or re-run federation would drift. Instead each weighted value ``x = weight * delta``
(one float64 product) is converted, on its own, to integers and added in int64.
Integer addition is exact and associative: the integers of each element depend only
on the weight and that element's value, so the sum, and so the next global model, is
bit-identical whatever the arrival order and chunk sizes. The same integer arithmetic
is what secure aggregation needs (masked fixed-point sums modulo 2**64).

**Two layouts.** A limb is an int64 array with one entry per element of the tensor.

- float64 tensors keep two limbs: ``hi = floor(x * 2**24)`` and
  ``lo = rint((x * 2**24 - hi) * 2**40)``, together :data:`FRACTION_BITS` (64)
  fractional bits. Every step is exact except the rounding of ``lo``, below ``2**-65``
  absolute per weighted value, so the mean keeps float64 precision even for updates
  of 1e-9. ``|x|`` must stay below ``2**38 / max_sites``.
- Every other dtype uses one limb (8 bytes per element: twice a float32 model, not
  four times). For float32, float16 and bfloat16, ``q = rint(x * 2**32)``
  (:data:`SINGLE_LIMB_FRACTION_BITS`): the rounding is at most ``2**-33`` absolute
  per weighted value, and ``|x|`` must stay below ``2**30 / max_sites``. Integer (and
  boolean) tensors need no fractional bits: ``q = weight * value`` exactly, with
  ``|x|`` below ``2**62 / max_sites``.

The range is checked chunk by chunk: a value too large to fold is rejected, never
wrapped, so with at most ``max_sites`` contributions no int64 sum can overflow (nor
can the low limbs, below 2**23 sites).

**Error bounds.** ``x`` itself is exact when ``weight * delta`` fits float64's 53-bit
significand: for float32 deltas whenever ``weight < 2**29`` (float16: ``2**42``,
bfloat16: ``2**45``); otherwise it carries one float64 rounding (relative ``2**-53``),
as do float64 deltas. With ``n`` updates of total weight ``W`` (each weight at least
1), the fixed-point error of the mean is at most ``n * 2**-33 / W <= 2**-33`` in the
one-limb float layout and ``n * 2**-65 / W`` in the two-limb layout; integer tensors
sum exactly. Decoding the sums adds only float64 rounding (relative ``2**-53`` for the
conversion and the division by ``W``). A float32 weight ``v`` is stored
to ``|v| * 2**-24``, so the one-limb error is below its resolution whenever
``|v| >= 2**-9 * n / W`` (``v`` of 2e-6 or more when sites average 1000 samples).
"""

from __future__ import annotations

import numpy as np

from fedloom.core.errors import UpdateRejected
from fedloom.core.weights import TensorSpec, check_finite, dtype_from_name, is_float

_HIGH_BITS = 24  # fractional bits of the high limb
_LOW_BITS = 40  # further fractional bits held by the low limb
FRACTION_BITS = _HIGH_BITS + _LOW_BITS
"""Fractional bits of the two-limb layout (float64 tensors)."""
SINGLE_LIMB_FRACTION_BITS = 32
"""Fractional bits of the one-limb layout of float32, float16 and bfloat16 tensors."""
_HIGH = float(2**_HIGH_BITS)
_LOW = float(2**_LOW_BITS)
_SINGLE = float(2**SINGLE_LIMB_FRACTION_BITS)
_RANGE = 2**62  # the sum of max_sites values below RANGE / max_sites fits an int64


def encode_limbs(
    name: str, limb_count: int, values: np.ndarray, weight: int, max_sites: int
) -> tuple[np.ndarray, ...]:
    """The ``limb_count`` limbs of ``weight * values`` (of tensor ``name``); refuses
    non-finite values, and values out of range for ``max_sites`` sums.

    The per-chunk hot path: for floats, one conversion, one in-place product and one
    max/min pass check the range; NaN and Inf fail that check too, and only then is
    ``values`` searched for them, to say which of the two refusals it is."""
    if limb_count == 1 and not is_float(values.dtype):
        limit = _RANGE // max_sites
        peak = max(abs(int(values.max())), abs(int(values.min()))) * weight if values.size else 0
        if peak >= limit:
            raise _out_of_range(name, peak, limit, max_sites)
        return (values.astype(np.int64) * np.int64(weight),)
    x = values.astype(np.float64)
    x *= float(weight)
    two = limb_count == 2
    bound = float(_RANGE) / max_sites / (_HIGH if two else _SINGLE)
    peak_x = max(float(x.max()), -float(x.min())) if x.size else 0.0
    if not peak_x < bound:  # NaN and Inf land here too
        check_finite({name: values})  # NaN or Inf: refused as such
        raise _out_of_range(name, peak_x, bound, max_sites)
    if two:
        return _split(x)
    x *= _SINGLE
    np.rint(x, out=x)
    return (x.astype(np.int64),)


_BLOCK = 1 << 15  # elements per step of fold(): its float64 and int64 buffers stay in cache


def check_range(name: str, values: np.ndarray, weight: int, max_sites: int) -> None:
    """Refuse what :func:`encode_limbs` would refuse for float32, float16 or bfloat16
    ``values`` (non-finite, or out of the one-limb range), reading them once; folds
    nothing.

    The largest ``|weight * value|`` is that of the largest ``|value|``: the product by
    a positive weight and its rounding are monotonic, so this is the same test."""
    if not values.size:
        return
    peak = max(float(values.max()), -float(values.min())) * float(weight)
    bound = float(_RANGE) / max_sites / _SINGLE
    if not peak < bound:  # NaN and Inf land here too
        check_finite({name: values})
        raise _out_of_range(name, peak, bound, max_sites)


def fold_float32(total: np.ndarray, values: np.ndarray, weight: int, sign: int) -> None:
    """``total += sign * rint(weight * values * 2**32)`` for float32 ``values``
    already passed by :func:`check_range`: the integers :func:`encode_limbs` makes, added in
    blocks small enough to stay in the processor's cache (about 4x faster than encoding
    a whole chunk first). ``weight * 2**32`` is exact and scaling by a power of two
    commutes with rounding, so the one product is the two products of ``encode_limbs``."""
    scale = float(weight) * _SINGLE
    if values.size <= _BLOCK:  # one block: no buffers to set up
        f = np.multiply(values, scale, dtype=np.float64)
        np.rint(f, out=f)
        if sign > 0:
            total += f.astype(np.int64)
        else:
            total -= f.astype(np.int64)
        return
    floats = np.empty(_BLOCK, dtype=np.float64)
    ints = np.empty(floats.size, dtype=np.int64)
    for start in range(0, values.size, _BLOCK):
        part = values[start : start + _BLOCK]
        f, q = floats[: part.size], ints[: part.size]
        np.multiply(part, scale, out=f, dtype=np.float64)
        np.rint(f, out=f)
        np.copyto(q, f, casting="unsafe")
        window = total[start : start + part.size]
        if sign > 0:
            window += q
        else:
            window -= q


def count_limbs(spec: TensorSpec) -> int:
    return 2 if dtype_from_name(spec.dtype) == np.float64 else 1


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two int64 limbs of ``x`` (consumed): ``x ~= (hi + lo / 2**40) / 2**24``.

    Every step is exact in float64 (scaling by powers of two, floor, the subtraction of
    its own floor) except the final rounding of ``lo``, below ``2**-65``.
    """
    x *= _HIGH
    hi = np.floor(x)
    x -= hi
    x *= _LOW
    np.rint(x, out=x)
    return hi.astype(np.int64), x.astype(np.int64)


def decode_limbs(spec: TensorSpec, limbs: tuple[np.ndarray, ...]) -> np.ndarray:
    """The float64 value of the limb sums of one tensor (flat, a new array).

    Computed in place, with no whole-tensor temporary beyond the result: the same
    operations, so the same bits, as ``(hi + lo / 2**40) / 2**24``.
    """
    if len(limbs) == 2:
        hi, lo = limbs
        value = lo.astype(np.float64)
        value /= _LOW
        value += hi
        value /= _HIGH
        return value
    (q,) = limbs
    value = q.astype(np.float64)
    if is_float(dtype_from_name(spec.dtype)):
        value /= _SINGLE
    return value


EXPLODED = "the update exploded"
"""How the refusal of an update too large to add up begins: the aggregator names the
sites whose updates exploded when such refusals stop a round."""


def _out_of_range(name: str, peak: float, limit: float, max_sites: int) -> UpdateRejected:
    return UpdateRejected(
        f"{EXPLODED}: tensor {name!r}: |weight x update| reaches {peak:.3g}, beyond "
        f"the fixed-point range {limit:.3g} for {max_sites} sites",
        hint="training diverged at the site, or the site is faulty or attacking: lower "
        "training.lr, check the site, or use a robust strategy (filtered-mean)",
    )
