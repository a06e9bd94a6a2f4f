"""Shamir secret sharing over the prime field ``2**521 - 1``, for secure aggregation.

A site splits the secrets that would unmask its update (its mask seed, its mask key)
into shares, one per neighbour, so that the aggregator can rebuild them from any
``threshold`` survivors when the site drops out, and from no fewer. The secret, at most
64 bytes, is prefixed with ``0x01`` before it becomes a field element so that leading
zero bytes survive the round trip and a wrong reconstruction is usually noticed.

When more than ``threshold`` shares are given, :func:`combine` checks that the extra ones
lie on the same polynomial: a corrupted or foreign share raises instead of silently
producing a wrong secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from fedloom.core.errors import AggregationError

PRIME = 2**521 - 1  # a Mersenne prime: every 64-byte secret (plus its prefix) fits below
SHARE_BYTES = 66  # ceil(521 / 8): a share's value, big-endian
MAX_SECRET_BYTES = 64
_PREFIX = 0x01

_HINT = "check that every share comes from the same round and the same site's secret"


def split(secret: bytes, *, shares: int, threshold: int) -> list[tuple[int, bytes]]:
    """Split ``secret`` into ``shares`` shares ``(x, value)`` with x = 1..shares, any
    ``threshold`` of which rebuild it and fewer of which reveal nothing about it."""
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret must be 1 to {MAX_SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= shares:
        raise ValueError(
            f"need 1 <= threshold <= shares, got threshold={threshold}, shares={shares}"
        )
    constant = int.from_bytes(bytes([_PREFIX]) + secret, "big")
    coefficients = [constant] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    result = []
    for x in range(1, shares + 1):
        value = 0
        for coefficient in reversed(coefficients):  # Horner
            value = (value * x + coefficient) % PRIME
        result.append((x, value.to_bytes(SHARE_BYTES, "big")))
    return result


def combine(shares: Sequence[tuple[int, bytes]], *, threshold: int) -> bytes:
    """The secret that ``shares`` were split from, given at least ``threshold`` of them.

    Interpolates at 0 through the ``threshold`` shares of smallest x and checks that every
    other share lies on the same polynomial.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, not {threshold}")
    points = sorted(_parse(shares), key=lambda point: point[0])
    if len(points) < threshold:
        raise AggregationError(
            f"cannot rebuild a secret from {len(points)} shares: {threshold} are needed",
            hint="too many sites dropped out of the round to recover the missing masks",
        )
    base, extra = points[:threshold], points[threshold:]
    xs = [x for x, _ in base]
    weights = _barycentric_weights(xs)
    for x, y in extra:
        if _evaluate(base, weights, x) != y:
            raise AggregationError(
                f"share x={x} does not lie on the polynomial of shares x={_listing(xs)}: "
                "a share is corrupted or belongs to another secret",
                hint=_HINT,
            )
    return _decode(_evaluate(base, weights, 0))


def _parse(shares: Sequence[tuple[int, bytes]]) -> list[tuple[int, int]]:
    """The shares as ``(x, y)`` integers, with every problem reported at once."""
    problems = []
    points = []
    seen: set[int] = set()
    for x, value in shares:
        if not 1 <= x < PRIME:
            problems.append(f"x={x} is outside 1..2**521-2")
        elif x in seen:
            problems.append(f"x={x} appears more than once")
        seen.add(x)
        if len(value) != SHARE_BYTES:
            problems.append(f"x={x} has {len(value)} bytes instead of {SHARE_BYTES}")
            continue
        y = int.from_bytes(value, "big")
        if y >= PRIME:
            problems.append(f"x={x} has a value outside the field")
        points.append((x, y))
    if problems:
        raise AggregationError("invalid secret shares: " + "; ".join(problems), hint=_HINT)
    return points


def _barycentric_weights(xs: list[int]) -> list[int]:
    """``w_j = 1 / prod_{m != j} (x_j - x_m)`` modulo PRIME."""
    weights = []
    for j, xj in enumerate(xs):
        denominator = 1
        for m, xm in enumerate(xs):
            if m != j:
                denominator = denominator * (xj - xm) % PRIME
        weights.append(pow(denominator, -1, PRIME))
    return weights


def _evaluate(points: list[tuple[int, int]], weights: list[int], x: int) -> int:
    """The polynomial through ``points`` at ``x`` (Lagrange, O(n) given the weights)."""
    n = len(points)
    # prefix[j] = prod_{m < j} (x - x_m), suffix[j] = prod_{m >= j} (x - x_m)
    prefix = [1] * (n + 1)
    suffix = [1] * (n + 1)
    for j in range(n):
        prefix[j + 1] = prefix[j] * (x - points[j][0]) % PRIME
    for j in range(n - 1, -1, -1):
        suffix[j] = suffix[j + 1] * (x - points[j][0]) % PRIME
    total = 0
    for j, (_, y) in enumerate(points):
        total = (total + y * weights[j] * prefix[j] * suffix[j + 1]) % PRIME
    return total


def _decode(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not 2 <= len(raw) <= MAX_SECRET_BYTES + 1 or raw[0] != _PREFIX:
        raise AggregationError(
            "the rebuilt secret is not well formed: the shares are corrupted or belong to "
            "different secrets",
            hint=_HINT,
        )
    return raw[1:]


def _listing(xs: list[int]) -> str:
    return ",".join(str(x) for x in xs)
