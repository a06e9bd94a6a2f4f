"""simulate() takes a user's own strategy object: it aggregates instead of the plan's, the
sites hear its configure(), the summary names it, and an object that is no strategy is
refused before any site starts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from workspaces import make_workspace

from fedloom import SimulationOptions, Strategy, StrategyState, Weights, load_plan, simulate
from fedloom.core.records import Failure, Summary
from fedloom.report import summary
from fedloom.strategies import FedAvg, RoundConfig, TrainSettings


class CountingMean:
    """A strategy of the user's own, written against the protocol (not a subclass): the
    federated mean, through a FedAvg it holds, counting its rounds."""

    name: ClassVar[str] = "counting-mean"
    needs_updates: ClassVar[bool] = False

    def __init__(self) -> None:
        self.inner = FedAvg()
        self.aggregated: list[int] = []
        self.configured: list[int] = []

    def init(self, weights: Weights) -> StrategyState:
        return self.inner.init(weights)

    def configure(self, round: int, state: StrategyState, settings: TrainSettings) -> RoundConfig:
        self.configured.append(round)
        return self.inner.configure(round, state, settings)

    def min_updates(self) -> int:
        return self.inner.min_updates()

    def tolerated(self, updates: int) -> int:
        return self.inner.tolerated(updates)

    def aggregate(
        self, round: int, state: StrategyState, summary: Summary, failures: Sequence[Failure]
    ) -> tuple[StrategyState, Weights]:
        self.aggregated.append(round)
        return self.inner.aggregate(round, state, summary, failures)


class Frozen(CountingMean):
    """Keeps the initial model whatever the sites send."""

    name: ClassVar[str] = "frozen"

    def init(self, weights: Weights) -> StrategyState:
        self.initial = {n: np.array(v) for n, v in weights.items()}
        return super().init(weights)

    def aggregate(
        self, round: int, state: StrategyState, summary: Summary, failures: Sequence[Failure]
    ) -> tuple[StrategyState, Weights]:
        self.aggregated.append(round)
        return state, dict(state.weights)


def test_a_users_strategy_object_aggregates_and_is_named_in_the_summary(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = load_plan(ws, ["rounds=3", "strategy.name=fedavg"])
    options = SimulationOptions(workers=0)
    reference = simulate(ws, plan, options)
    mine = CountingMean()
    typed: Strategy = mine  # it follows the protocol (mypy checks this line)
    assert typed is mine
    result = simulate(ws, plan, options, strategy=mine)
    assert mine.aggregated == [1, 2, 3] and mine.configured[:3] == [1, 2, 3]
    assert sorted(result.final_weights) == sorted(reference.final_weights)
    for name, value in reference.final_weights.items():  # the same mean, bit for bit
        assert np.array_equal(result.final_weights[name], value), name
    assert result.strategy == "counting-mean" and reference.strategy is None
    assert summary(result, "r")["strategy"] == "counting-mean"
    assert summary(reference, "r")["strategy"] == "fedavg"

    frozen = Frozen()
    kept = simulate(ws, plan, options, strategy=frozen)
    assert frozen.aggregated == [1, 2, 3]
    for name, value in frozen.initial.items():  # the model the run started from is kept
        assert np.array_equal(kept.final_weights[name], value), name
    assert any(not np.array_equal(frozen.initial[n], v) for n, v in reference.final_weights.items())


def test_an_object_that_is_no_strategy_is_refused_before_any_site_starts(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = load_plan(ws, ["rounds=1"])

    class Half:
        name = "half"

        def aggregate(self) -> None: ...

    with pytest.raises(TypeError, match=r"Half is not a fedloom strategy: it lacks needs_updates"):
        simulate(ws, plan, SimulationOptions(workers=0), strategy=Half())  # type: ignore[arg-type]
