"""Streaming aggregation of updates, independent of arrival order and of chunking.

Mean-based strategies need only the weighted sum of the updates, so the aggregator
folds each update into one running sum chunk by chunk, as it streams in, and keeps
none of it: O(model) memory however many sites take part and however large the model.

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

**Rollback.** A :class:`Contribution` spools the bytes it folded (in memory up to 64
MiB, then in a temporary file); :meth:`Contribution.abort` recomputes the same
integers and subtracts them, leaving the sums bit-identical to what they were before
it began: a stream rejected half-way, broken off, or cut by the round's deadline
leaves no trace.

Robust strategies need every update: :class:`UpdateBuffer` keeps them, and hands them
over sorted by site name.
"""

from __future__ import annotations

import tempfile
import threading
import zlib
from collections.abc import Iterable, Mapping
from typing import IO

import numpy as np

from fedloom.errors import AggregationError, FedloomError, UpdateRejected
from fedloom.records import MeanSummary, SiteResult, SiteUpdate, UpdateSet
from fedloom.weights import TensorSpec, Weights, check_compatible, dtype_from_name, is_float

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
_MAX_WEIGHT = 2**53  # exact as a float64
_SPOOL_BYTES = 64 * 1024 * 1024  # a rollback spool moves from memory to disk beyond this
_PIECE_BYTES = 4 * 1024 * 1024  # chunking of fold() and of a rollback's re-reads


class Contribution:
    """One site's update while it streams in, chunk by chunk.

    :meth:`add` checks each chunk (order, size, element boundaries, finite values,
    checksum) and takes it in; :meth:`finish` commits the whole update; :meth:`abort`
    undoes everything taken in. The three are atomic with respect to each other, and
    :meth:`abort` may come from another thread (a round closing at its deadline) and
    waits only for a chunk being folded, never for the network. A chunk that is refused
    aborts the contribution at once. After an abort, :meth:`add` and :meth:`finish`
    raise :class:`UpdateRejected` with the abort's reason.

    With ``require_checksums``, the chunk that completes each tensor must carry the
    CRC-32 of the whole tensor; without it a checksum is checked only when present.
    """

    def __init__(
        self, specs: tuple[TensorSpec, ...], site: str, weight: int, *, require_checksums: bool
    ) -> None:
        self.site = site
        self.weight = weight
        self.specs = specs
        self._dtypes = [dtype_from_name(s.dtype) for s in specs]
        self._received = [0] * len(specs)
        self._crc = [0] * len(specs)
        self._require_checksums = require_checksums
        self._lock = threading.Lock()
        self._ended: str | None = None  # why no more chunks are taken

    def add(
        self, tensor: int, offset: int, data: bytes | memoryview, checksum: int | None = None
    ) -> None:
        """Take bytes ``[offset, offset + len(data))`` of tensor number ``tensor``."""
        with self._lock:
            if self._ended is not None:
                raise UpdateRejected(self._ended)
            try:
                raw = memoryview(data).cast("B")
                crc = self._check(tensor, offset, raw, checksum)
                values = np.frombuffer(raw, dtype=self._dtypes[tensor])
                self._take(tensor, offset, raw, values)
            except BaseException as err:
                self._rollback(_reason(err))
                raise
            self._received[tensor] = offset + len(raw)
            self._crc[tensor] = crc

    def finish(self) -> None:
        """Commit the update; :class:`UpdateRejected` (and rolled back) if incomplete."""
        with self._lock:
            if self._ended is not None:
                raise UpdateRejected(self._ended)
            try:
                for spec, got in zip(self.specs, self._received, strict=True):
                    if got != spec.nbytes:
                        raise UpdateRejected(
                            f"stream ended early: tensor {spec.name!r} has {got} of "
                            f"{spec.nbytes} bytes"
                        )
                self._commit()
            except BaseException as err:
                self._rollback(_reason(err))
                raise
            self._ended = f"the update of site {self.site!r} is already complete"

    def abort(self, reason: str = "the update was abandoned") -> None:
        """Undo everything taken in; later calls raise ``reason``. Idempotent; nothing
        happens after :meth:`finish`."""
        with self._lock:
            if self._ended is None:
                self._rollback(reason)

    def _check(self, tensor: int, offset: int, raw: memoryview, checksum: int | None) -> int:
        """Refuse a chunk that does not continue its tensor; return the running CRC."""
        if not 0 <= tensor < len(self.specs):
            raise UpdateRejected(f"chunk for tensor #{tensor}, but only {len(self.specs)} exist")
        spec, expected = self.specs[tensor], self._received[tensor]
        end = offset + len(raw)
        if offset != expected:
            raise UpdateRejected(
                f"tensor {spec.name!r}: chunk at byte {offset}, expected {expected}"
            )
        if end > spec.nbytes:
            raise UpdateRejected(
                f"tensor {spec.name!r} is larger than announced ({spec.nbytes} bytes)"
            )
        itemsize = self._dtypes[tensor].itemsize
        if len(raw) % itemsize:
            raise UpdateRejected(
                f"tensor {spec.name!r}: a chunk of {len(raw)} bytes splits a "
                f"{itemsize}-byte {spec.dtype} value"
            )
        crc = zlib.crc32(raw, self._crc[tensor])
        if checksum is not None and end != spec.nbytes:
            raise UpdateRejected(
                f"tensor {spec.name!r}: checksum mismatch (sent on the chunk ending at byte "
                f"{end}, before the tensor's end at {spec.nbytes})"
            )
        if (checksum is not None and checksum != crc) or (
            checksum is None and self._require_checksums and end == spec.nbytes
        ):
            sent = "none" if checksum is None else f"{checksum:#010x}"
            raise UpdateRejected(
                f"tensor {spec.name!r}: checksum mismatch (sent {sent}, the received bytes "
                f"give {crc:#010x})",
                hint="the bytes changed on the way, or the sender's chunking went wrong",
            )
        return crc

    def _rollback(self, reason: str) -> None:
        self._ended = reason
        self._undo()

    def _take(self, tensor: int, offset: int, raw: memoryview, values: np.ndarray) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        raise NotImplementedError


class MeanAccumulator:
    """Running fixed-point sum of ``weight * delta`` over the updates of one round.

    ``max_sites`` bounds how many updates may be folded (or streaming) at once; with
    it, the per-value range check guarantees no int64 sum can overflow.
    """

    needs_updates = False

    def __init__(self, specs: tuple[TensorSpec, ...], *, max_sites: int) -> None:
        self.specs = specs
        self._max_sites = max(1, max_sites)
        self._limbs = [
            tuple(np.zeros(s.size, dtype=np.int64) for _ in range(_limb_count(s))) for s in specs
        ]
        self._lock = threading.Lock()
        self._sites: set[str] = set()
        self._streaming: set[str] = set()
        self.total_weight = 0

    @property
    def count(self) -> int:
        return len(self._sites)

    def begin(self, site: str, weight: int, *, require_checksums: bool = False) -> Contribution:
        """Start folding ``site``'s update of aggregation weight ``weight``."""
        weight = _check_weight(weight)
        with self._lock:
            _check_new(site, self._sites, self._streaming)
            if len(self._sites) + len(self._streaming) >= self._max_sites:
                raise UpdateRejected(f"more than {self._max_sites} updates in one round")
            self._streaming.add(site)
        return _MeanContribution(self, site, weight, require_checksums=require_checksums)

    def fold(self, site: str, weight: int, delta: Mapping[str, np.ndarray]) -> None:
        """Add ``weight * delta`` whole. Raises :class:`UpdateRejected` and changes
        nothing if the update is malformed, non-finite, too large, or ``site`` already
        folded."""
        check_compatible(delta, self.specs)
        _stream_arrays(self.begin(site, weight), delta.values())

    def summary(self, round: int, results: tuple[SiteResult, ...]) -> MeanSummary:
        """The weighted mean of everything folded so far (float64)."""
        with self._lock:
            if self._streaming:
                raise AggregationError(
                    f"{len(self._streaming)} update(s) still streaming: finish or abort "
                    "them before reading the sum"
                )
            weight = float(self.total_weight)
            mean: Weights = {}
            for spec, limbs in zip(self.specs, self._limbs, strict=True):
                total = _decode(spec, limbs)
                value = total / weight if weight else np.zeros(spec.size)
                mean[spec.name] = value.reshape(spec.shape)
            return MeanSummary(round, mean, weight, results)

    def fixed_point_sums(self) -> dict[str, tuple[np.ndarray, ...]]:
        """Copies of the int64 limb sums of each tensor (flat): one limb, or two for
        float64 tensors. Sums of streams still in flight are included."""
        with self._lock:
            return {
                s.name: tuple(limb.copy() for limb in limbs)
                for s, limbs in zip(self.specs, self._limbs, strict=True)
            }

    def _encode(self, tensor: int, values: np.ndarray, weight: int) -> tuple[np.ndarray, ...]:
        """The limbs of ``weight * values``; refuses non-finite or out-of-range values."""
        spec = self.specs[tensor]
        if len(self._limbs[tensor]) == 1 and not is_float(values.dtype):
            limit = _RANGE // self._max_sites
            peak = (
                max(abs(int(values.max())), abs(int(values.min()))) * weight if values.size else 0
            )
            if peak >= limit:
                raise _out_of_range(spec.name, peak, limit, self._max_sites)
            return (values.astype(np.int64) * np.int64(weight),)
        x = values.astype(np.float64)
        _check_finite(spec.name, x)
        x *= float(weight)
        two = len(self._limbs[tensor]) == 2
        bound = float(_RANGE) / self._max_sites / (_HIGH if two else _SINGLE)
        peak_x = float(np.max(np.abs(x))) if x.size else 0.0
        if peak_x >= bound:
            raise _out_of_range(spec.name, peak_x, bound, self._max_sites)
        if two:
            return _split(x)
        x *= _SINGLE
        np.rint(x, out=x)
        return (x.astype(np.int64),)

    def _apply(self, tensor: int, start: int, limbs: tuple[np.ndarray, ...], sign: int) -> None:
        with self._lock:
            for total, part in zip(self._limbs[tensor], limbs, strict=True):
                window = total[start : start + part.size]
                if sign > 0:
                    window += part
                else:
                    window -= part

    def _commit(self, site: str, weight: int) -> None:
        with self._lock:
            self._streaming.discard(site)
            if site in self._sites:
                raise UpdateRejected(f"site {site!r} already sent an update for this round")
            self._sites.add(site)
            self.total_weight += weight

    def _release(self, site: str) -> None:
        with self._lock:
            self._streaming.discard(site)


class _MeanContribution(Contribution):
    """Folds each chunk into the accumulator's sums, and spools its bytes for abort."""

    def __init__(
        self, accumulator: MeanAccumulator, site: str, weight: int, *, require_checksums: bool
    ) -> None:
        super().__init__(accumulator.specs, site, weight, require_checksums=require_checksums)
        self._accumulator = accumulator
        self._spool: IO[bytes] | None = None
        self._spooled = 0
        self._segments: list[list[int]] = []  # [tensor, offset, length, spool position]

    def _take(self, tensor: int, offset: int, raw: memoryview, values: np.ndarray) -> None:
        if not len(raw):
            return
        limbs = self._accumulator._encode(tensor, values, self.weight)
        if self._spool is None:
            self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115
        self._spool.write(raw)
        at, self._spooled = self._spooled, self._spooled + len(raw)
        self._accumulator._apply(tensor, offset // values.itemsize, limbs, +1)
        last = self._segments[-1] if self._segments else None
        if last is not None and (last[0], last[1] + last[2], last[3] + last[2]) == (
            tensor,
            offset,
            at,
        ):
            last[2] += len(raw)  # continues the previous segment, in the tensor and the spool
        else:
            self._segments.append([tensor, offset, len(raw), at])

    def _commit(self) -> None:
        self._accumulator._commit(self.site, self.weight)
        self._close_spool()

    def _undo(self) -> None:
        try:
            for tensor, offset, length, at in reversed(self._segments):
                assert self._spool is not None  # noqa: S101 - a segment was spooled
                dtype = self._dtypes[tensor]
                self._spool.seek(at)
                for start in range(0, length, _PIECE_BYTES):
                    data = self._spool.read(min(_PIECE_BYTES, length - start))
                    values = np.frombuffer(data, dtype=dtype)
                    limbs = self._accumulator._encode(tensor, values, self.weight)
                    position = (offset + start) // dtype.itemsize
                    self._accumulator._apply(tensor, position, limbs, -1)
            self._segments.clear()
        finally:
            self._close_spool()
            self._accumulator._release(self.site)

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


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

    def begin(self, site: str, weight: int, *, require_checksums: bool = False) -> Contribution:
        """Start receiving ``site``'s update of aggregation weight ``weight``."""
        weight = _check_weight(weight)
        with self._lock:
            _check_new(site, set(self._updates), self._streaming)
            self._streaming.add(site)
        return _BufferContribution(self, site, weight, require_checksums=require_checksums)

    def fold(self, site: str, weight: int, delta: Mapping[str, np.ndarray]) -> None:
        check_compatible(delta, self.specs)
        _stream_arrays(self.begin(site, weight), delta.values())

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

    def __init__(
        self, buffer: UpdateBuffer, site: str, weight: int, *, require_checksums: bool
    ) -> None:
        super().__init__(buffer.specs, site, weight, require_checksums=require_checksums)
        self._buffer = buffer
        self._data: list[bytearray | None] = [None] * len(buffer.specs)

    def _take(self, tensor: int, offset: int, raw: memoryview, values: np.ndarray) -> None:
        if is_float(values.dtype):
            _check_finite(self.specs[tensor].name, values)
        data = self._data[tensor]
        if data is None:
            data = self._data[tensor] = bytearray(self.specs[tensor].nbytes)
        data[offset : offset + len(raw)] = raw

    def _commit(self) -> None:
        delta: Weights = {}
        for spec, dtype, data in zip(self.specs, self._dtypes, self._data, strict=True):
            delta[spec.name] = np.frombuffer(data or bytearray(), dtype=dtype).reshape(spec.shape)
        self._buffer._commit(SiteUpdate(self.site, self.weight, delta))
        self._data = []

    def _undo(self) -> None:
        self._data = []
        self._buffer._release(self.site)


Accumulator = MeanAccumulator | UpdateBuffer


def make_accumulator(
    specs: tuple[TensorSpec, ...], *, needs_updates: bool, max_sites: int
) -> Accumulator:
    if needs_updates:
        return UpdateBuffer(specs)
    return MeanAccumulator(specs, max_sites=max_sites)


def _stream_arrays(contribution: Contribution, arrays: Iterable[np.ndarray]) -> None:
    """Stream whole arrays through ``contribution`` as zero-copy chunks, then finish."""
    try:
        for index, (spec, array) in enumerate(zip(contribution.specs, arrays, strict=True)):
            flat = np.ascontiguousarray(array, dtype=dtype_from_name(spec.dtype)).reshape(-1)
            raw = flat.view(np.uint8).data
            if not len(raw):
                contribution.add(index, 0, b"")
            for start in range(0, len(raw), _PIECE_BYTES):
                contribution.add(index, start, raw[start : start + _PIECE_BYTES])
        contribution.finish()
    except BaseException as err:
        contribution.abort(_reason(err))
        raise


def _limb_count(spec: TensorSpec) -> int:
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


def _decode(spec: TensorSpec, limbs: tuple[np.ndarray, ...]) -> np.ndarray:
    """The float64 value of the limb sums of one tensor (flat)."""
    if len(limbs) == 2:
        hi, lo = limbs
        return (hi.astype(np.float64) + lo.astype(np.float64) / _LOW) / _HIGH
    (q,) = limbs
    if is_float(dtype_from_name(spec.dtype)):
        return q.astype(np.float64) / _SINGLE
    return q.astype(np.float64)


def _check_weight(weight: int) -> int:
    if weight <= 0:
        raise UpdateRejected(f"aggregation weight must be positive, got {weight}")
    if weight > _MAX_WEIGHT:
        raise UpdateRejected(f"aggregation weight {weight} is beyond 2**53")
    return int(weight)


def _check_new(site: str, folded: set[str], streaming: set[str]) -> None:
    if site in folded:
        raise UpdateRejected(f"site {site!r} already sent an update for this round")
    if site in streaming:
        raise UpdateRejected(f"site {site!r} is already sending an update for this round")


def _check_finite(name: str, values: np.ndarray) -> None:
    native = values if values.dtype in (np.float32, np.float64) else values.astype(np.float32)
    finite = np.isfinite(native)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise UpdateRejected(f"tensor {name!r} holds {bad} NaN or Inf values")


def _out_of_range(name: str, peak: float, limit: float, max_sites: int) -> UpdateRejected:
    return UpdateRejected(
        f"tensor {name!r}: |weight x update| reaches {peak:.3g}, beyond the fixed-point "
        f"range {limit:.3g} for {max_sites} sites",
        hint="the update is far larger than training produces; check the site",
    )


def _reason(err: BaseException) -> str:
    if isinstance(err, FedloomError):
        return err.message
    return f"{type(err).__name__}: {err}"
