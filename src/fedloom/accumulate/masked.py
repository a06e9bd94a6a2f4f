"""The sum of masked updates modulo ``2**bits``: what secure aggregation folds.

Under secure aggregation a site sends its update as fixed-point integers plus masks
(:mod:`fedloom.privacy.secagg`), each tensor as unsigned ``bits``-bit integers. The
aggregator can only add them up: the sum wraps around modulo ``2**bits`` exactly as the
masks do, and only the whole sum, unmasked, means anything.

It streams like the mean (:mod:`~fedloom.accumulate.mean`): each chunk is added as it
arrives, in O(model) memory, and an update that breaks off is subtracted again from its
spool, leaving the sums bit-identical. ``admit(site)`` decides who may contribute (the
sites that took part in the round's key exchange).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedloom.accumulate.contribution import (
    Contribution,
    FoldedSites,
    check_new,
    check_weight,
)
from fedloom.accumulate.mean import MeanContribution
from fedloom.core.errors import AggregationError, UpdateRejected
from fedloom.core.weights import TensorSpec


class MaskedSumAccumulator(FoldedSites):
    """Running sum modulo ``2**bits`` of the masked updates of one round."""

    needs_updates = False

    def __init__(
        self,
        specs: tuple[TensorSpec, ...],
        *,
        admit: Callable[[str], None],
        spool_dir: Path | None = None,
    ) -> None:
        dtypes = {s.dtype for s in specs}
        if not dtypes <= {"uint32", "uint64"} or len(dtypes) > 1:
            raise AggregationError(f"masked updates are uint32 or uint64 tensors, got {dtypes}")
        self.specs = specs
        self._admit = admit
        self.spool_dir = spool_dir  # where a rollback's spool files go
        self._sums = [np.zeros(s.size, dtype=s.dtype) for s in specs]
        self.deferred = (False,) * len(specs)  # every tensor is added as it streams in
        super().__init__()  # the sites' bookkeeping; the masked values are already weighted
        self._read = False

    def begin(self, site: str, sample_weight: int) -> Contribution:
        sample_weight = check_weight(sample_weight)
        self._admit(site)  # UpdateRejected if the site has no masks agreed for this round
        with self._lock:
            if self._read:
                raise UpdateRejected(f"the masked sum was already read: {site!r} came too late")
            check_new(site, self._sites, self._streaming)
            self._streaming.add(site)
        return MeanContribution(self, site, sample_weight)  # type: ignore[arg-type]

    def sums(self) -> list[np.ndarray]:
        """The sums, tensor by tensor (flat); read once, after every stream ended."""
        with self._lock:
            if self._streaming:
                raise AggregationError(f"{len(self._streaming)} masked update(s) still streaming")
            self._read = True
            return self._sums

    # the interface MeanContribution folds through
    def _check_range(self, tensor: int, values: np.ndarray, weight: int) -> None:
        return None  # any value is a value modulo 2**bits: the unmasking checks the sum

    def _fold(self, tensor: int, start: int, values: np.ndarray, weight: int, sign: int) -> None:
        with self._lock:
            window = self._sums[tensor][start : start + values.size]
            if sign > 0:
                window += values  # unsigned: wraps modulo 2**bits, as the masks do
            else:
                window -= values
