"""Keeping every update whole, for robust strategies.

Robust strategies (median, trimmed mean, Krum) need every update, not only their sum:
:class:`UpdateBuffer` keeps each one once it has streamed in completely and been
checked, and hands them over sorted by site name.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from fedloom.accumulate.contribution import (
    Contribution,
    check_new,
    check_weight,
    stream_arrays,
)
from fedloom.core.errors import UpdateRejected
from fedloom.core.records import SiteResult, SiteUpdate, UpdateSet
from fedloom.core.weights import TensorSpec, Weights, check_compatible, check_finite


class UpdateBuffer:
    """Keeps each update (robust strategies must see them all)."""

    needs_updates = True

    def __init__(self, specs: tuple[TensorSpec, ...]) -> None:
        self.specs = specs
        self._updates: dict[str, SiteUpdate] = {}
        self._streaming: set[str] = set()
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self._updates)

    @property
    def total_weight(self) -> int:
        return sum(u.num_samples for u in self._updates.values())

    def begin(self, site: str, sample_weight: int) -> Contribution:
        """Start receiving ``site``'s update of aggregation weight ``sample_weight``."""
        sample_weight = check_weight(sample_weight)
        with self._lock:
            check_new(site, set(self._updates), self._streaming)
            self._streaming.add(site)
        return _BufferContribution(self, site, sample_weight)

    def fold(self, site: str, sample_weight: int, delta: Mapping[str, np.ndarray]) -> None:
        check_compatible(delta, self.specs)
        stream_arrays(self.begin(site, sample_weight), delta.values())

    def summary(self, round: int, results: tuple[SiteResult, ...]) -> UpdateSet:
        with self._lock:
            ordered = tuple(self._updates[s] for s in sorted(self._updates))
        return UpdateSet(round, ordered, results)

    def _commit(self, update: SiteUpdate) -> None:
        with self._lock:
            self._streaming.discard(update.site)
            if update.site in self._updates:
                raise UpdateRejected(f"site {update.site!r} already sent an update for this round")
            self._updates[update.site] = update

    def _release(self, site: str) -> None:
        with self._lock:
            self._streaming.discard(site)


class _BufferContribution(Contribution):
    """Fills one buffer per tensor; the update is kept only once it is complete."""

    def __init__(self, buffer: UpdateBuffer, site: str, weight: int) -> None:
        super().__init__(buffer.specs, site, weight)
        self._buffer = buffer
        self._data: list[bytearray | None] = [None] * len(buffer.specs)

    def _take(self, tensor: int, offset: int, raw: memoryview, values: np.ndarray) -> None:
        check_finite({self.specs[tensor].name: values})  # passes integer tensors
        data = self._data[tensor]
        if data is None:
            data = self._data[tensor] = bytearray(self.specs[tensor].nbytes)
        data[offset : offset + len(raw)] = raw

    def _commit(self) -> None:
        delta: Weights = {}
        for spec, dtype, data in zip(self.specs, self._dtypes, self._data, strict=True):
            delta[spec.name] = np.frombuffer(data or bytearray(), dtype=dtype).reshape(spec.shape)
        self._buffer._commit(SiteUpdate(self.site, self.sample_weight, delta))
        self._data = []

    def _undo(self) -> None:
        self._data = []
        self._buffer._release(self.site)
