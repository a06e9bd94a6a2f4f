"""One update while it streams in, and the checks every accumulator shares.

A :class:`Contribution` takes a site's update chunk by chunk: it checks each chunk
(order, size, element boundaries) before its accumulator takes it in, and can undo
everything taken in. Checksums are the transport's business
(:mod:`fedloom.transport.integrity`): chunks reach a contribution already verified.
The helpers below check what :meth:`begin` is given (weight, site) and stream whole
arrays through a contribution for :meth:`fold`.

**Rollback.** A contribution to the mean spools the bytes it folded (in memory up to 64
MiB, then in a temporary file in the accumulator's ``spool_dir``);
:meth:`Contribution.abort` recomputes the same integers and subtracts them, leaving
the sums bit-identical to what they were before it began: a stream rejected half-way,
broken off, or cut by the round's deadline leaves no trace. A contribution to the
buffer just drops what it held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np

from fedloom.core.chunks import chunk_problem, missing_problem
from fedloom.core.errors import FedloomError, UpdateRejected
from fedloom.core.weights import TensorSpec, dtype_from_name

_MAX_WEIGHT = 2**53  # exact as a float64
PIECE_BYTES = 4 * 1024 * 1024  # chunking of fold() and of a rollback's re-reads


class Contribution:
    """One site's update while it streams in, chunk by chunk.

    :meth:`add` checks each chunk (order, size, element boundaries, finite values)
    and takes it in; :meth:`finish` commits the whole update; :meth:`abort` undoes
    everything taken in. These are atomic with respect to each other, and
    :meth:`abort` may come from another thread (a round closing at its deadline) and
    waits only for a chunk being folded, never for the network. A chunk that is refused
    aborts the contribution at once. After an abort, :meth:`add` and :meth:`finish`
    raise :class:`UpdateRejected` with the abort's reason.

    :meth:`check_complete` tells whether every tensor arrived whole without rolling
    anything back, so a caller can refuse an incomplete update before it takes a lock
    that a rollback (re-reading the spool) must not hold.
    """

    def __init__(self, specs: tuple[TensorSpec, ...], site: str, sample_weight: int) -> None:
        self.site = site
        self.sample_weight = sample_weight
        self.specs = specs
        self._dtypes = [dtype_from_name(s.dtype) for s in specs]
        self._received = [0] * len(specs)
        self._lock = threading.Lock()
        self._ended: str | None = None  # why no more chunks are taken

    def add(self, tensor: int, offset: int, data: bytes | memoryview) -> None:
        """Take bytes ``[offset, offset + len(data))`` of tensor number ``tensor``."""
        with self._lock:
            if self._ended is not None:
                raise UpdateRejected(self._ended)
            try:
                raw = memoryview(data).cast("B")
                self._check(tensor, offset, raw)
                values = np.frombuffer(raw, dtype=self._dtypes[tensor])
                self._take(tensor, offset, raw, values)
            except BaseException as err:
                self._rollback(_reason(err))
                raise
            self._received[tensor] = offset + len(raw)

    def finish(self) -> None:
        """Commit the update; :class:`UpdateRejected` (and rolled back) if incomplete."""
        with self._lock:
            if self._ended is not None:
                raise UpdateRejected(self._ended)
            try:
                self._check_complete()
                self._commit()
            except BaseException as err:
                self._rollback(_reason(err))
                raise
            self._ended = f"the update of site {self.site!r} is already complete"

    def check_complete(self) -> None:
        """:class:`UpdateRejected` ("stream ended early: ...") unless every tensor
        arrived whole, or with the abort's reason after an abort. Rolls nothing back:
        the caller aborts (or finishes) when it is ready to."""
        with self._lock:
            if self._ended is not None:
                raise UpdateRejected(self._ended)
            self._check_complete()

    def abort(self, reason: str = "the update was abandoned") -> None:
        """Undo everything taken in; later calls raise ``reason``. Idempotent; nothing
        happens after :meth:`finish`."""
        with self._lock:
            if self._ended is None:
                self._rollback(reason)

    def _check(self, tensor: int, offset: int, raw: memoryview) -> None:
        """Refuse a chunk that does not continue its tensor."""
        problem = chunk_problem(self.specs, self._received, tensor, offset, len(raw))
        if problem is not None:
            raise UpdateRejected(problem)
        spec = self.specs[tensor]
        itemsize = self._dtypes[tensor].itemsize
        if len(raw) % itemsize:
            raise UpdateRejected(
                f"tensor {spec.name!r}: a chunk of {len(raw)} bytes splits a "
                f"{itemsize}-byte {spec.dtype} value"
            )

    def _check_complete(self) -> None:
        problem = missing_problem(self.specs, self._received)
        if problem is not None:
            raise UpdateRejected(problem)

    def _rollback(self, reason: str) -> None:
        self._ended = reason
        self._undo()

    def _take(self, tensor: int, offset: int, raw: memoryview, values: np.ndarray) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        raise NotImplementedError


def stream_arrays(contribution: Contribution, arrays: Iterable[np.ndarray]) -> None:
    """Stream whole arrays through ``contribution`` as zero-copy chunks, then finish."""
    try:
        for index, (spec, array) in enumerate(zip(contribution.specs, arrays, strict=True)):
            flat = np.ascontiguousarray(array, dtype=dtype_from_name(spec.dtype)).reshape(-1)
            raw = flat.view(np.uint8).data
            if not len(raw):
                contribution.add(index, 0, b"")
            for start in range(0, len(raw), PIECE_BYTES):
                contribution.add(index, start, raw[start : start + PIECE_BYTES])
        contribution.finish()
    except BaseException as err:
        contribution.abort(_reason(err))
        raise


def check_weight(weight: int) -> int:
    if weight <= 0:
        raise UpdateRejected(f"aggregation weight must be positive, got {weight}")
    if weight > _MAX_WEIGHT:
        raise UpdateRejected(f"aggregation weight {weight} is beyond 2**53")
    return int(weight)


def check_new(site: str, folded: set[str], streaming: set[str]) -> None:
    if site in folded:
        raise UpdateRejected(f"site {site!r} already sent an update for this round")
    if site in streaming:
        raise UpdateRejected(f"site {site!r} is already sending an update for this round")


def _reason(err: BaseException) -> str:
    if isinstance(err, FedloomError):
        return err.message
    return f"{type(err).__name__}: {err}"


class FoldedSites:
    """Who has folded an update into an accumulator's sums, who is streaming one, and
    with what weight: the bookkeeping the mean and the masked sum share. ``_lock`` also
    guards the sums of the subclass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sites: set[str] = set()
        self._streaming: set[str] = set()
        self._weights: dict[str, int] = {}

    @property
    def count(self) -> int:
        return len(self._sites)

    @property
    def total_weight(self) -> int:
        return sum(self._weights.values())

    @property
    def weights(self) -> dict[str, int]:
        """Each folded site's weight."""
        with self._lock:
            return dict(self._weights)

    def _commit(self, site: str, weight: int, also: Callable[[], None] | None = None) -> None:
        """Count ``site``'s update as folded; ``also`` runs under the same lock, so that
        what it records is there exactly when the update counts."""
        with self._lock:
            self._streaming.discard(site)
            if site in self._sites:
                raise UpdateRejected(f"site {site!r} already sent an update for this round")
            self._sites.add(site)
            self._weights[site] = weight
            if also is not None:
                also()

    def _release(self, site: str) -> None:
        with self._lock:
            self._streaming.discard(site)
