"""Streaming aggregation of updates, independent of arrival order.

Mean-based strategies need only the weighted sum of the updates, so the aggregator
folds each update into one running sum as it arrives and forgets it: O(model) memory
however many sites take part.

**Why fixed point.** Floating-point addition is not associative, so a float sum would
depend on the order in which sites happen to answer, and a resumed or re-run
federation would drift. Instead each weighted update is converted, on its own, to
integers with :data:`FRACTION_BITS` fractional bits (``round(weight * delta * 2**S)``)
and added in int64. Integer addition is exact and associative: the sum, and so the
next global model, is bit-identical whatever the arrival order, without holding early
arrivals back. The conversion error is at most ``2**-(S+1)`` per site and coordinate,
far below float32 resolution of a mean update; the range is checked before an update
is folded (an update too large to fold is rejected, never wrapped). The same integer
arithmetic is what secure aggregation needs (masked fixed-point sums modulo 2**64).

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

FRACTION_BITS = 24
_SCALE = float(2**FRACTION_BITS)


class MeanAccumulator:
    """Running fixed-point sum of ``weight * delta`` over the updates of one round.

    ``max_sites`` bounds how many updates may be folded; with it, the per-update range
    check guarantees the int64 sum cannot overflow.
    """

    needs_updates = False

    def __init__(self, specs: tuple[TensorSpec, ...], *, max_sites: int) -> None:
        self.specs = specs
        self._sums = {s.name: np.zeros(s.shape, dtype=np.int64) for s in specs}
        self._limit = float(2**62) / max(1, max_sites) / _SCALE
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
        quantised: dict[str, np.ndarray] = {}
        for name, d in delta.items():
            scaled = np.array(d, dtype=np.float64)  # a copy, and an array even when 0-d
            scaled *= float(weight)
            peak = float(np.max(np.abs(scaled))) if scaled.size else 0.0
            if peak >= self._limit:
                raise UpdateRejected(
                    f"tensor {name!r}: |weight x update| reaches {peak:.3g}, beyond the "
                    f"fixed-point range {self._limit:.3g} for {self._max_sites} sites",
                    hint="the update is far larger than training produces; check the site",
                )
            scaled *= _SCALE
            np.rint(scaled, out=scaled)
            quantised[name] = scaled.astype(np.int64)
        with self._lock:
            if site in self._sites:
                raise UpdateRejected(f"site {site!r} already sent an update for this round")
            if len(self._sites) >= self._max_sites:
                raise UpdateRejected(f"more than {self._max_sites} updates in one round")
            for name, q in quantised.items():
                self._sums[name] += q
            self._sites.add(site)
            self.total_weight += weight

    def summary(self, round: int, results: tuple[SiteResult, ...]) -> MeanSummary:
        """The weighted mean of everything folded so far (float64)."""
        with self._lock:
            denom = self.total_weight * _SCALE
            mean: Weights = {
                name: (s.astype(np.float64) / denom if denom else np.zeros(s.shape))
                for name, s in self._sums.items()
            }
            return MeanSummary(round, mean, float(self.total_weight), results)


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
