"""The weighted mean, as an exact fixed-point sum folded in as updates stream.

Mean-based strategies need only the weighted sum of the updates, so the aggregator
folds each update into one running sum chunk by chunk, as it streams in, and keeps
none of it: O(model) memory however many sites take part and however large the model.
Each weighted value becomes int64 limbs (:mod:`~fedloom.accumulate.limbs`, which
explains the layouts, the range and the error bounds), so the sum is exact and
bit-identical whatever the arrival order and chunk sizes.

A contribution spools the bytes it folded (in memory up to 64 MiB, then in a temporary
file in ``spool_dir``, by default the system's temporary folder): its abort recomputes
the same integers and subtracts them, leaving the sums bit-identical to what they were
before it began.

:meth:`MeanAccumulator.summary` decodes the sums tensor by tensor and releases each
tensor's limbs as soon as its mean is decoded, so the limbs and the float64 mean are
never both held whole: it consumes the accumulator.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedloom.accumulate.contribution import (
    PIECE_BYTES,
    Contribution,
    FoldedSites,
    check_new,
    check_weight,
    stream_arrays,
)
from fedloom.accumulate.deferred import (
    DEFERRED_DTYPES,
    KeptIndex,
    KeptUpdate,
    close_spools,
    deferred_mean,
    deferred_sums,
)
from fedloom.accumulate.limbs import (
    check_range,
    count_limbs,
    decode_limbs,
    encode_limbs,
    fold_float32,
)
from fedloom.accumulate.spool import Spool
from fedloom.core.errors import AggregationError, UpdateRejected
from fedloom.core.records import MeanSummary, SiteResult
from fedloom.core.weights import LazyWeights, TensorSpec, Weights, check_compatible

_SPOOL_BYTES = 64 * 1024 * 1024  # a rollback spool moves from memory to disk beyond this
# the spool of an update kept until the round closes (a narrow-float model's) holds
# less in memory: every site's stays until then
_KEPT_SPOOL_BYTES = 4 * 1024 * 1024


_NARROW_FLOATS = frozenset({"float32", "float16", "bfloat16"})


class MeanAccumulator(FoldedSites):
    """Running fixed-point sum of ``weight * delta`` over the updates of one round.

    ``max_sites`` bounds how many updates may be folded (or streaming) at once; with
    it, the per-value range check guarantees no int64 sum can overflow.

    ``spool_dir`` is where a streaming update's rollback spool goes once it outgrows 64
    MiB of memory (it is deleted when the update is committed or aborted); None means
    the system's temporary folder, which on some systems is itself memory (tmpfs).
    """

    needs_updates = False

    def __init__(
        self, specs: tuple[TensorSpec, ...], *, max_sites: int, spool_dir: Path | None = None
    ) -> None:
        self.specs = specs
        self._max_sites = max(1, max_sites)
        self.spool_dir = spool_dir  # where a rollback's spool files go
        self._layout = tuple(count_limbs(s) for s in specs)
        # bfloat16 and float16 tensors: summed from the kept spools when the round closes
        self.deferred = tuple(s.dtype in DEFERRED_DTYPES for s in specs)
        self._limbs = [
            () if later else tuple(np.zeros(s.size, dtype=np.int64) for _ in range(n))
            for s, n, later in zip(specs, self._layout, self.deferred, strict=True)
        ]
        self._kept: list[KeptUpdate] = []  # committed updates with deferred tensors
        # their spools close when the accumulator goes, unless a summary took them
        weakref.finalize(self, close_spools, self._kept)
        super().__init__()
        self._summarised: int | None = None  # the round summary() was read for

    def begin(self, site: str, sample_weight: int) -> Contribution:
        """Start folding ``site``'s update of aggregation weight ``sample_weight``; refused
        (:class:`UpdateRejected`) once :meth:`summary` has consumed the sums."""
        sample_weight = check_weight(sample_weight)
        with self._lock:
            if self._summarised is not None:
                raise UpdateRejected(
                    f"the mean of round {self._summarised} was already read: "
                    f"the update of site {site!r} came too late"
                )
            check_new(site, self._sites, self._streaming)
            if len(self._sites) + len(self._streaming) >= self._max_sites:
                raise UpdateRejected(f"more than {self._max_sites} updates in one round")
            self._streaming.add(site)
        return MeanContribution(self, site, sample_weight)

    def fold(self, site: str, sample_weight: int, delta: Mapping[str, np.ndarray]) -> None:
        """Add ``sample_weight * delta`` whole. Raises :class:`UpdateRejected` and changes
        nothing if the update is malformed, non-finite, too large, or ``site`` already
        folded."""
        check_compatible(delta, self.specs)
        stream_arrays(self.begin(site, sample_weight), delta.values())

    def summary(self, round: int, results: tuple[SiteResult, ...]) -> MeanSummary:
        """The weighted mean of everything folded. Consumes the accumulator.

        The mean of a float32, float16 or bfloat16 tensor is float32 (computed in float64
        from the exact sums, then rounded once): such a model cannot hold more, and the
        summary of a large model takes half the memory. Float64 and integer tensors get
        a float64 mean.

        Each tensor's limbs are released as soon as its mean is decoded, so the peak is
        about the limbs plus one tensor's mean, not the limbs and the whole mean. Once
        it has run, :meth:`summary` and :meth:`fixed_point_sums` raise
        :class:`AggregationError`, :meth:`begin` and :meth:`fold` raise
        :class:`UpdateRejected` (a late update); :attr:`count` and
        :attr:`total_weight` still answer.
        """
        with self._lock:
            self._check_readable()
            if self._streaming:
                raise AggregationError(
                    f"{len(self._streaming)} update(s) still streaming: finish or abort "
                    "them before reading the sum"
                )
            self._summarised = round
            weight = float(self.total_weight)
            mean: Weights = {}
            for index, spec in enumerate(self.specs):
                if self.deferred[index]:
                    continue  # computed when read: the LazyWeights below
                limbs, self._limbs[index] = self._limbs[index], ()
                value = decode_limbs(spec, limbs) if weight else np.zeros(spec.size)
                del limbs  # the last reference: this tensor's sums are freed here
                if weight:
                    value /= weight
                if spec.dtype in _NARROW_FLOATS:  # the model's precision, half the bytes
                    value = value.astype(np.float32)
                mean[spec.name] = value.reshape(spec.shape)
            if not any(self.deferred):
                return MeanSummary(round, mean, weight, results)
            kept = list(self._kept)
            self._kept.clear()
            segments = KeptIndex(kept, len(self.specs))
            index_of = {s.name: i for i, s in enumerate(self.specs)}
            max_sites, specs = self._max_sites, self.specs

            def compute_block(name: str, start: int, stop: int) -> np.ndarray:
                i = index_of[name]
                return deferred_mean(specs[i], i, segments, max_sites, weight, start, stop)

            lazy = LazyWeights(specs, mean, compute_block)
            weakref.finalize(lazy, close_spools, kept)  # the spools close when the mean goes
            return MeanSummary(round, lazy, weight, results)

    def fixed_point_sums(self) -> dict[str, tuple[np.ndarray, ...]]:
        """Copies of the int64 limb sums of each tensor (flat): one limb, or two for
        float64 tensors. Sums of streams still in flight are included, but for bfloat16
        and float16 tensors (summed from the committed updates' spools). Not after
        :meth:`summary`, which released them (:class:`AggregationError`)."""
        with self._lock:
            self._check_readable()
            index = KeptIndex(self._kept, len(self.specs))
            return {
                s.name: (
                    (deferred_sums(s, i, index, self._max_sites, 0, s.size),)
                    if self.deferred[i]
                    else tuple(limb.copy() for limb in self._limbs[i])
                )
                for i, s in enumerate(self.specs)
            }

    def _check_readable(self) -> None:
        if self._summarised is not None:
            raise AggregationError(
                f"the sums of round {self._summarised} were released when its mean was "
                "read: summary() consumes the accumulator",
                hint="keep the MeanSummary that the first summary() call returned",
            )

    def _check_range(self, tensor: int, values: np.ndarray, weight: int) -> None:
        """Refuse non-finite or out-of-range values of ``weight * values``; folds nothing."""
        spec = self.specs[tensor]
        if self._layout[tensor] == 1 and spec.dtype in _NARROW_FLOATS:
            check_range(spec.name, values, weight, self._max_sites)
        else:  # the other layouts: the encoding itself checks
            encode_limbs(spec.name, self._layout[tensor], values, weight, self._max_sites)

    def _fold(self, tensor: int, start: int, values: np.ndarray, weight: int, sign: int) -> None:
        """Add (``sign`` +1) or remove (-1) ``weight * values`` at element ``start`` of
        ``tensor``'s sums; the values passed :meth:`_check_range`."""
        spec, count = self.specs[tensor], self._layout[tensor]
        if self.deferred[tensor]:
            return  # summed from the spool when the round closes
        with self._lock:
            sums = self._limbs[tensor]
            if count == 1 and values.dtype == np.float32:
                fold_float32(sums[0][start : start + values.size], values, weight, sign)
                return
            limbs = encode_limbs(spec.name, count, values, weight, self._max_sites)
            for total, part in zip(sums, limbs, strict=True):
                window = total[start : start + part.size]
                if sign > 0:
                    window += part
                else:
                    window -= part


class MeanContribution(Contribution):
    """Folds each chunk into the accumulator's sums, and spools its bytes for abort."""

    def __init__(self, accumulator: MeanAccumulator, site: str, weight: int) -> None:
        super().__init__(accumulator.specs, site, weight)
        self._accumulator = accumulator
        self._keeps = any(accumulator.deferred)
        limit = _KEPT_SPOOL_BYTES if self._keeps else _SPOOL_BYTES
        self._spool = Spool(limit, accumulator.spool_dir)
        self._segments: list[tuple[int, int, int]] = []  # tensor, element, spool piece

    def _take(self, tensor: int, offset: int, raw: memoryview, values: np.ndarray) -> None:
        if not len(raw):
            return
        self._accumulator._check_range(tensor, values, self.sample_weight)  # before any change
        piece = self._spool.add(raw)
        start = offset // values.itemsize
        self._accumulator._fold(tensor, start, values, self.sample_weight, +1)
        self._segments.append((tensor, start, piece))

    def _commit(self) -> None:
        if not self._keeps:
            self._accumulator._commit(self.site, self.sample_weight)
            self._spool.close()
            return
        # the deferred tensors are summed from the spool when the round closes: it is kept
        # in the same step that counts the update
        kept = KeptUpdate(self.site, self.sample_weight, self._spool, self._segments)
        self._accumulator._commit(
            self.site, self.sample_weight, also=lambda: self._accumulator._kept.append(kept)
        )

    def _undo(self) -> None:
        try:
            for tensor, start, piece in reversed(self._segments):
                if self._accumulator.deferred[tensor]:
                    continue  # nothing was added: the spool was all
                dtype = self._dtypes[tensor]
                for at, data in self._spool.read(piece, PIECE_BYTES):
                    values = np.frombuffer(data, dtype=dtype)
                    element = start + at // dtype.itemsize
                    self._accumulator._fold(tensor, element, values, self.sample_weight, -1)
            self._segments.clear()
        finally:
            self._spool.close()
            self._accumulator._release(self.site)
