"""Streaming aggregation of updates, independent of arrival order.

Mean-based strategies need only the weighted sum of the updates, so the aggregator
folds each update into one running sum as it arrives and forgets it: O(model) memory
however many sites take part.

**Why fixed point.** Floating-point addition is not associative, so a float sum would
depend on the order in which sites happen to answer, and a resumed or re-run
federation would drift. Instead each weighted update ``x = weight * delta`` (float64)
is converted, on its own, to integers and added in int64. Integer addition is exact
and associative: the sum, and so the next global model, is bit-identical whatever the
arrival order, without holding early arrivals back.

Each value is split exactly into two limbs: ``hi = floor(x * 2**24)`` and
``lo = round((x * 2**24 - hi) * 2**40)``, summed in two int64 arrays. Together they
hold x to :data:`FRACTION_BITS` (64) fractional bits: the only rounding is below
``2**-65`` absolute per weighted value, so the mean keeps float64 precision for usual
updates and about ten significant digits even for updates of 1e-9. The range is
checked before an update is folded: ``|x|`` must stay below ``2**38 / max_sites`` (an
update too large to fold is rejected, never wrapped); the low
limbs cannot overflow below 2**23 sites. The same integer arithmetic is what secure
aggregation needs (masked fixed-point sums modulo 2**64).

Robust strategies need every update: :class:`UpdateBuffer` keeps them, and hands them
over sorted by site name.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from fedloom.errors import UpdateRejected
from fedloom.records import MeanSummary, SiteResult, SiteUpdate, UpdateSet
from fedloom.weights import TensorSpec, Weights, check_compatible, check_finite

_HIGH_BITS = 24  # fractional bits of the high limb
_LOW_BITS = 40  # further fractional bits held by the low limb
FRACTION_BITS = _HIGH_BITS + _LOW_BITS
_HIGH = float(2**_HIGH_BITS)
_LOW = float(2**_LOW_BITS)


class MeanAccumulator:
    """Running fixed-point sum of ``weight * delta`` over the updates of one round.

    ``max_sites`` bounds how many updates may be folded; with it, the per-update range
    check guarantees the int64 sum cannot overflow.
    """

    needs_updates = False

    def __init__(self, specs: tuple[TensorSpec, ...], *, max_sites: int) -> None:
        self.specs = specs
        self._high = {s.name: np.zeros(s.shape, dtype=np.int64) for s in specs}
        self._low = {s.name: np.zeros(s.shape, dtype=np.int64) for s in specs}
        self._limit = float(2**62) / max(1, max_sites) / _HIGH
        self._max_sites = max(1, max_sites)
        self._lock = threading.Lock()
        self._sites: set[str] = set()
        self.total_weight = 0

    @property
    def count(self) -> int:
        return len(self._sites)

    def fold(self, site: str, weight: int, delta: Mapping[str, np.ndarray]) -> None:
        """Add ``weight * delta``. Raises :class:`UpdateRejected` and changes nothing
        if the update is malformed, non-finite, too large, or ``site`` already folded."""
        check_compatible(delta, self.specs)
        check_finite(delta)
        if weight <= 0:
            raise UpdateRejected(f"aggregation weight must be positive, got {weight}")
        quantised: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, d in delta.items():
            x = np.array(d, dtype=np.float64)  # a copy, and an array even when 0-d
            x *= float(weight)
            peak = float(np.max(np.abs(x))) if x.size else 0.0
            if peak >= self._limit:
                raise UpdateRejected(
                    f"tensor {name!r}: |weight x update| reaches {peak:.3g}, beyond the "
                    f"fixed-point range {self._limit:.3g} for {self._max_sites} sites",
                    hint="the update is far larger than training produces; check the site",
                )
            quantised[name] = _split(x)
        with self._lock:
            if site in self._sites:
                raise UpdateRejected(f"site {site!r} already sent an update for this round")
            if len(self._sites) >= self._max_sites:
                raise UpdateRejected(f"more than {self._max_sites} updates in one round")
            for name, (hi, lo) in quantised.items():
                self._high[name] += hi
                self._low[name] += lo
            self._sites.add(site)
            self.total_weight += weight

    def summary(self, round: int, results: tuple[SiteResult, ...]) -> MeanSummary:
        """The weighted mean of everything folded so far (float64)."""
        with self._lock:
            mean: Weights = {}
            for name, hi in self._high.items():
                total = hi.astype(np.float64) + self._low[name].astype(np.float64) / _LOW
                weight = float(self.total_weight)
                mean[name] = total / (_HIGH * weight) if weight else np.zeros(hi.shape)
            return MeanSummary(round, mean, float(self.total_weight), results)


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


class UpdateBuffer:
    """Keeps each update (robust strategies must see them all)."""

    needs_updates = True

    def __init__(self, specs: tuple[TensorSpec, ...]) -> None:
        self.specs = specs
        self._updates: dict[str, SiteUpdate] = {}
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self._updates)

    @property
    def total_weight(self) -> int:
        return sum(u.num_samples for u in self._updates.values())

    def fold(self, site: str, weight: int, delta: Mapping[str, np.ndarray]) -> None:
        check_compatible(delta, self.specs)
        check_finite(delta)
        if weight <= 0:
            raise UpdateRejected(f"aggregation weight must be positive, got {weight}")
        update = SiteUpdate(site, weight, {k: np.asarray(v) for k, v in delta.items()})
        with self._lock:
            if site in self._updates:
                raise UpdateRejected(f"site {site!r} already sent an update for this round")
            self._updates[site] = update

    def summary(self, round: int, results: tuple[SiteResult, ...]) -> UpdateSet:
        with self._lock:
            ordered = tuple(self._updates[s] for s in sorted(self._updates))
        return UpdateSet(round, ordered, results)


Accumulator = MeanAccumulator | UpdateBuffer


def make_accumulator(
    specs: tuple[TensorSpec, ...], *, needs_updates: bool, max_sites: int
) -> Accumulator:
    if needs_updates:
        return UpdateBuffer(specs)
    return MeanAccumulator(specs, max_sites=max_sites)
