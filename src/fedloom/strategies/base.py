"""The strategy interface.

A strategy never runs the loop. The orchestration layer selects sites, streams the
updates into an accumulator and then calls :meth:`Strategy.aggregate` with what was
folded: a :class:`~fedloom.core.records.MeanSummary` for mean-based strategies, or an
:class:`~fedloom.core.records.UpdateSet` for robust ones that declare ``needs_updates``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

from fedloom.core.records import Failure, RoundConfig, Summary, TrainSettings
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights


class Strategy(Protocol):
    name: ClassVar[str]
    needs_updates: ClassVar[bool]
    """True when the strategy needs each site's update (median, Krum): the aggregator
    then buffers them. False for mean-based strategies, which fold updates as they
    stream in O(model) memory."""

    def init(self, weights: Weights) -> StrategyState:
        """The state before round 1, holding the initial global model."""
        ...

    def configure(self, round: int, state: StrategyState, settings: TrainSettings) -> RoundConfig:
        """What every site is asked for ``round``, from the plan's training ``settings``:
        the settings for the round (FedProx sets ``proximal_mu``) and options for the
        task."""
        ...

    def min_updates(self) -> int:
        """The fewest updates a round needs to be aggregated (Krum: ``2f + 3``)."""
        ...

    def tolerated(self, updates: int) -> int:
        """The most bad updates, among ``updates`` in a round, that the strategy is built
        to withstand: 0 for the mean strategies, ``num_byzantine`` for Krum, fewer than
        half for the medians. The plan warns when an attack scenario exceeds it."""
        ...

    def aggregate(
        self,
        round: int,
        state: StrategyState,
        summary: Summary,
        failures: Sequence[Failure],
    ) -> tuple[StrategyState, Weights]:
        """The next state and the next global model."""
        ...
