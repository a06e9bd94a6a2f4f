"""Byzantine-robust strategies: coordinate-wise Median, TrimmedMean, Krum, MultiKrum, and
GeometricMedian (RFA), which needs no count of bad sites.

They declare ``needs_updates = True``, so the aggregator buffers every site's update and
passes an :class:`~fedloom.core.records.UpdateSet`. Median and TrimmedMean ignore sample
counts (a site could lie about them); so does GeometricMedian unless told otherwise;
MultiKrum weights the updates it selects by their
``num_samples``, which the plan caps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

from fedloom.core.errors import AggregationError
from fedloom.core.records import SiteUpdate, Summary, UpdateSet
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights
from fedloom.strategies.aggregate import (
    check_same_layout,
    coordinate_median,
    geometric_median,
    krum,
    multi_krum,
    near_centre,
    trimmed_mean,
    weighted_mean,
)
from fedloom.strategies.fedavg import BaseStrategy


def updates_of(
    strategy: str, round: int, state: StrategyState, summary: Summary
) -> tuple[SiteUpdate, ...]:
    """The round's individual updates, each checked against the global model.

    Raises :class:`AggregationError` when ``summary`` is not an :class:`UpdateSet` or
    belongs to another round.
    """
    if not isinstance(summary, UpdateSet):
        raise AggregationError(
            f"strategy {strategy!r} needs every site's update (an UpdateSet), "
            f"got {type(summary).__name__}",
            hint=f"{strategy!r} has needs_updates = True: the aggregator must buffer updates",
        )
    if summary.round != round:
        raise AggregationError(
            f"strategy {strategy!r} was asked to aggregate round {round} "
            f"with the updates of round {summary.round}"
        )
    for update in summary.updates:
        try:
            check_same_layout(update.delta, state.weights)
        except AggregationError as err:
            raise AggregationError(f"site {update.site!r}: {err.message}", hint=err.hint) from err
    return summary.updates


@dataclass(frozen=True, kw_only=True)
class _RobustStrategy(BaseStrategy):
    """A strategy fed every site's update (an :class:`UpdateSet`); a subclass only says
    how :meth:`_combine` makes them one."""

    def _delta(self, round: int, state: StrategyState, summary: Summary) -> Weights | None:
        updates = updates_of(self.name, round, state, summary)
        return self._combine(updates) if updates else None

    def _combine(self, updates: Sequence[SiteUpdate]) -> Weights:
        """The update to apply, from a round's non-empty ``updates``."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Median(_RobustStrategy):
    """Coordinate-wise median of the updates (Yin et al., 2018)."""

    name: ClassVar[str] = "median"
    needs_updates: ClassVar[bool] = True

    def tolerated(self, updates: int) -> int:
        return (updates - 1) // 2

    def _combine(self, updates: Sequence[SiteUpdate]) -> Weights:
        return coordinate_median([u.delta for u in updates])


@dataclass(frozen=True, kw_only=True)
class TrimmedMean(_RobustStrategy):
    """Coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, drop the
    ``floor(trim_fraction * n)`` largest and smallest values and average the rest."""

    name: ClassVar[str] = "trimmed-mean"
    needs_updates: ClassVar[bool] = True

    trim_fraction: Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)] = 0.1

    def tolerated(self, updates: int) -> int:
        return math.floor(self.trim_fraction * updates)

    def _combine(self, updates: Sequence[SiteUpdate]) -> Weights:
        return trimmed_mean([u.delta for u in updates], self.trim_fraction)


@dataclass(frozen=True, kw_only=True)
class Krum(_RobustStrategy):
    """Krum (Blanchard et al., 2017): apply the one update closest to its
    ``n - f - 2`` nearest neighbours. Needs more than ``2f + 2`` updates a round."""

    name: ClassVar[str] = "krum"
    needs_updates: ClassVar[bool] = True

    num_byzantine: Annotated[int, Field(ge=0, le=10_000)] = 1

    def min_updates(self) -> int:
        return 2 * self.num_byzantine + 3

    def tolerated(self, updates: int) -> int:
        return self.num_byzantine

    def _combine(self, updates: Sequence[SiteUpdate]) -> Weights:
        return updates[krum([u.delta for u in updates], self.num_byzantine)].delta


@dataclass(frozen=True, kw_only=True)
class MultiKrum(_RobustStrategy):
    """Multi-Krum (Blanchard et al., 2017): average, weighted by ``num_samples``, the
    ``num_selected`` updates with the lowest Krum scores (``None``: ``n - f``)."""

    name: ClassVar[str] = "multi-krum"
    needs_updates: ClassVar[bool] = True

    num_byzantine: Annotated[int, Field(ge=0, le=10_000)] = 1
    num_selected: Annotated[int, Field(ge=1, le=10_000)] | None = None

    def min_updates(self) -> int:
        return max(2 * self.num_byzantine + 3, self.num_selected or 0)

    def tolerated(self, updates: int) -> int:
        """``num_byzantine``, and no more than the updates it leaves out: keeping
        ``num_selected`` of ``n``, it averages in an attacker once ``n - num_selected``
        are fewer than the attackers."""
        selected = self.num_selected or updates - self.num_byzantine
        return max(0, min(self.num_byzantine, updates - selected))

    def _combine(self, updates: Sequence[SiteUpdate]) -> Weights:
        deltas = [u.delta for u in updates]
        count = self.num_selected
        if count is None:
            count = len(updates) - self.num_byzantine
        chosen = multi_krum(deltas, self.num_byzantine, count)
        return weighted_mean([deltas[i] for i in chosen], [updates[i].num_samples for i in chosen])


@dataclass(frozen=True, kw_only=True)
class GeometricMedian(_RobustStrategy):
    """The geometric median of the updates (RFA: Pillutla, Kakade, Harchaoui, 2022), by
    Weiszfeld's iterations: robust to any minority of bad updates without being
    told how many there are. ``sample_weighted`` weights each update by its capped
    sample count (RFA's choice) instead of counting every site once."""

    name: ClassVar[str] = "geometric-median"
    needs_updates: ClassVar[bool] = True

    max_iterations: Annotated[int, Field(ge=1, le=10_000)] = 100
    tolerance: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 1e-6
    sample_weighted: bool = False

    def tolerated(self, updates: int) -> int:
        return (updates - 1) // 2

    def _combine(self, updates: Sequence[SiteUpdate]) -> Weights:
        weights = [u.num_samples for u in updates] if self.sample_weighted else None
        return geometric_median(
            [u.delta for u in updates],
            weights,
            max_iterations=self.max_iterations,
            tolerance=self.tolerance,
        )


@dataclass(frozen=True, kw_only=True)
class FilteredMean(_RobustStrategy):
    """The mean of the updates near their geometric median: a skipped mean (Hampel,
    1985) around RFA's robust centre. The geometric median counts every site once; the
    updates within ``radius`` times the median distance to it are kept and averaged,
    weighted by their capped sample counts. Needs no count of bad sites; with none, and
    every update kept, it is FedAvg's mean."""

    name: ClassVar[str] = "filtered-mean"
    needs_updates: ClassVar[bool] = True

    radius: Annotated[float, Field(ge=1, le=1e6, allow_inf_nan=False)] = 4.0
    max_iterations: Annotated[int, Field(ge=1, le=10_000)] = 100
    tolerance: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 1e-6

    def tolerated(self, updates: int) -> int:
        return (updates - 1) // 2

    def _combine(self, updates: Sequence[SiteUpdate]) -> Weights:
        deltas = [u.delta for u in updates]
        centre = geometric_median(
            deltas,
            max_iterations=self.max_iterations,
            tolerance=self.tolerance,
        )
        kept = near_centre(deltas, centre, self.radius)
        return weighted_mean([deltas[i] for i in kept], [updates[i].num_samples for i in kept])
