"""Mean-based strategies: FedAvg, FedAvgM and FedProx.

They receive a :class:`~fedloom.core.records.MeanSummary` whose ``mean_delta`` is already
the sample-weighted mean of the sites' updates, so the server only decides how far to
move along it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field

from fedloom.core.errors import AggregationError, StateError
from fedloom.core.records import Failure, MeanSummary, RoundConfig, Summary, TrainSettings
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights, apply_delta, copy_weights
from fedloom.strategies.aggregate import check_same_layout
from fedloom.strategies.optimizers import PLAIN, ServerOptimizer, momentum


def mean_delta_of(
    strategy: str, round: int, state: StrategyState, summary: Summary
) -> Mapping[str, np.ndarray] | None:
    """The round's mean update, checked against the global model; None if no site answered.

    Raises :class:`AggregationError` when ``summary`` is not a :class:`MeanSummary` or
    belongs to another round.
    """
    if not isinstance(summary, MeanSummary):
        raise AggregationError(
            f"strategy {strategy!r} aggregates a MeanSummary, got {type(summary).__name__}",
            hint=f"{strategy!r} has needs_updates = False: pass the accumulator's mean",
        )
    if summary.round != round:
        raise AggregationError(
            f"strategy {strategy!r} was asked to aggregate round {round} "
            f"with the summary of round {summary.round}"
        )
    if not summary.results:
        return None
    check_same_layout(summary.mean_delta, state.weights)
    return summary.mean_delta


def state_group(strategy: str, state: StrategyState, group: str) -> Weights:
    """``state.arrays[group]``, or :class:`StateError` if the state lacks it."""
    try:
        return state.arrays[group]
    except KeyError:
        raise StateError(
            f"strategy {strategy!r} needs the array group {group!r}, "
            f"the state holds {sorted(state.arrays)}",
            hint="the state was made by another strategy: start from its init()",
        ) from None


def next_step(state: StrategyState) -> dict[str, Any]:
    """``state.scalars`` with the ``"step"`` counter (aggregations applied) increased."""
    return {**state.scalars, "step": int(state.scalars.get("step", 0)) + 1}


def moved(
    state: StrategyState, step: Mapping[str, np.ndarray], **groups: Weights
) -> tuple[StrategyState, Weights]:
    """The state with the model moved by ``step``, the step count increased and the array
    groups in ``groups`` replaced, and the new model."""
    weights = apply_delta(state.weights, step)
    changes: dict[str, Any] = {"arrays": {**state.arrays, **groups}} if groups else {}
    return state.evolve(weights=weights, scalars=next_step(state), **changes), weights


@dataclass(frozen=True, kw_only=True)
class BaseStrategy:
    """What every built-in strategy shares: ``init`` keeps a copy of the model, a step
    count of 0 and what the server optimiser keeps; ``configure`` asks for the plan's
    settings; ``aggregate`` leaves the state as it is when :meth:`_delta` finds no update,
    else moves the model as :meth:`optimizer` says. A strategy is its ``_delta`` (the mean,
    or a robust combination) composed with a server optimiser."""

    name: ClassVar[str]
    needs_updates: ClassVar[bool]

    def optimizer(self) -> ServerOptimizer:
        """How the model moves by the round's update: by the update itself."""
        return PLAIN

    def init(self, weights: Weights) -> StrategyState:
        groups = self.optimizer().init(weights)
        return StrategyState(weights=copy_weights(weights), arrays=groups, scalars={"step": 0})

    def configure(self, round: int, state: StrategyState, settings: TrainSettings) -> RoundConfig:
        return RoundConfig(settings)

    def min_updates(self) -> int:
        return 1

    def tolerated(self, updates: int) -> int:
        return 0  # a mean: one update, large enough, moves it anywhere

    def aggregate(
        self, round: int, state: StrategyState, summary: Summary, failures: Sequence[Failure]
    ) -> tuple[StrategyState, Weights]:
        delta = self._delta(round, state, summary)
        if delta is None:
            return state, state.weights
        optimizer = self.optimizer()
        kept = {group: state_group(self.name, state, group) for group in optimizer.groups}
        groups, step = optimizer.apply(kept, delta)
        return moved(state, step, **groups)

    def _delta(
        self, round: int, state: StrategyState, summary: Summary
    ) -> Mapping[str, np.ndarray] | None:
        """The round's update, checked; None if no site answered: the sample-weighted
        mean of the updates (a :class:`MeanSummary`), unless a robust strategy says
        otherwise."""
        return mean_delta_of(self.name, round, state, summary)


@dataclass(frozen=True, kw_only=True)
class FedAvg(BaseStrategy):
    """Federated averaging (McMahan et al., 2017): the new model is the old one plus the
    sample-weighted mean of the updates."""

    name: ClassVar[str] = "fedavg"
    needs_updates: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class FedProx(BaseStrategy):
    """FedProx (Li et al., 2020): FedAvg on the server; sites add the proximal term
    ``(proximal_mu / 2) * ||w - w_global||**2`` to their local loss."""

    name: ClassVar[str] = "fedprox"
    needs_updates: ClassVar[bool] = False

    proximal_mu: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 0.01

    def configure(self, round: int, state: StrategyState, settings: TrainSettings) -> RoundConfig:
        return RoundConfig(dataclasses.replace(settings, proximal_mu=self.proximal_mu))


@dataclass(frozen=True, kw_only=True)
class FedAvgM(BaseStrategy):
    """FedAvg with server momentum (Hsu et al., 2019).

    ``m = momentum * m + mean_delta`` and the model moves by ``server_lr * m``. The
    buffer ``m`` (float64) is kept in ``state.arrays["momentum"]``. With
    ``momentum = 0`` and ``server_lr = 1`` this is FedAvg.
    """

    name: ClassVar[str] = "fedavgm"
    needs_updates: ClassVar[bool] = False

    server_lr: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 1.0
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.9

    def optimizer(self) -> ServerOptimizer:
        return momentum(server_lr=self.server_lr, coef=self.momentum)
