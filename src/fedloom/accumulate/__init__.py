"""Streaming aggregation of updates, independent of arrival order and of chunking.

Each site's update is taken in chunk by chunk, as it streams in, through a
:class:`Contribution` (:mod:`~fedloom.accumulate.contribution`), which checks every
chunk and can undo all it took in, leaving no trace of a stream rejected half-way or
cut by the round's deadline. Where it goes depends on the strategy:

- :class:`MeanAccumulator` (:mod:`~fedloom.accumulate.mean`) folds it into one exact
  fixed-point sum, bit-identical whatever the arrival order and chunk sizes, in
  O(model) memory; :mod:`~fedloom.accumulate.limbs` encodes each weighted value as
  int64 limbs and documents the layouts, the range and the error bounds.
- :class:`UpdateBuffer` (:mod:`~fedloom.accumulate.buffer`) keeps every update, for
  robust strategies.

:func:`make_accumulator` picks the one a strategy needs.
"""

from __future__ import annotations

from pathlib import Path

from fedloom.accumulate.buffer import UpdateBuffer
from fedloom.accumulate.contribution import Contribution
from fedloom.accumulate.limbs import FRACTION_BITS, SINGLE_LIMB_FRACTION_BITS
from fedloom.accumulate.mean import MeanAccumulator
from fedloom.core.weights import TensorSpec

Accumulator = MeanAccumulator | UpdateBuffer


def make_accumulator(
    specs: tuple[TensorSpec, ...],
    *,
    needs_updates: bool,
    max_sites: int,
    spool_dir: Path | None = None,
) -> Accumulator:
    """The accumulator a strategy needs; ``spool_dir`` is where the mean's rollback
    spools go beyond 64 MiB (:class:`MeanAccumulator`; the buffer keeps no spool)."""
    if needs_updates:
        return UpdateBuffer(specs)
    return MeanAccumulator(specs, max_sites=max_sites, spool_dir=spool_dir)


__all__ = [
    "FRACTION_BITS",
    "SINGLE_LIMB_FRACTION_BITS",
    "Accumulator",
    "Contribution",
    "MeanAccumulator",
    "UpdateBuffer",
    "make_accumulator",
]
