"""FedNova: each update normalised by its site's local steps, against a naive reference;
the step counts travel as a typed field from the task to the strategy, in a real
simulation and through the wire format."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom import SimulationOptions, create_workspace, load_plan, simulate
from fedloom.core.errors import AggregationError
from fedloom.core.records import SiteResult, SiteUpdate, UpdateSet
from fedloom.core.weights import Weights
from fedloom.strategies import build_strategy
from fedloom.strategies.fednova import fednova_delta
from fedloom.transport import UpdateHeader, serde


def naive(deltas: list[list[float]], samples: list[int], steps: list[int]) -> list[float]:
    """Wang et al.'s update, element by element in Python floats."""
    total = sum(samples)
    tau_eff = sum(n / total * t for n, t in zip(samples, steps, strict=True))
    return [
        tau_eff * sum(n / total * d[j] / t for d, n, t in zip(deltas, samples, steps, strict=True))
        for j in range(len(deltas[0]))
    ]


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.lists(st.floats(-10, 10), min_size=3, max_size=3),
            st.integers(1, 500),
            st.integers(1, 200),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fednova_is_the_step_normalised_mean(data: list[tuple[list[float], int, int]]) -> None:
    deltas = [{"w": np.array(d)} for d, _, _ in data]
    samples, steps = [n for _, n, _ in data], [t for _, _, t in data]
    got = fednova_delta(deltas, samples, steps)["w"]
    want = naive([d for d, _, _ in data], samples, steps)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if len(set(steps)) == 1:  # equal steps: FedAvg's sample-weighted mean
        mean = sum(n * np.array(d) for d, n, _ in data) / sum(samples)
        np.testing.assert_allclose(got, mean, rtol=1e-12, atol=1e-12)


def update_set(steps: dict[str, int]) -> UpdateSet:
    updates = tuple(SiteUpdate(s, 10, {"w": np.ones(2, np.float32)}) for s in sorted(steps))
    results = tuple(SiteResult(s, 1, 10, 10, {}, t) for s, t in sorted(steps.items()))
    return UpdateSet(1, updates, results)


def test_a_site_that_reports_no_steps_is_named() -> None:
    strategy = build_strategy("fednova", {})
    state = strategy.init({"w": np.zeros(2, np.float32)})
    with pytest.raises(AggregationError, match="site-b reported none"):
        strategy.aggregate(1, state, update_set({"site-a": 4, "site-b": 0}), ())
    _, weights = strategy.aggregate(1, state, update_set({"site-a": 4, "site-b": 2}), ())
    # equal shares, steps 4 and 2: tau_eff = 3, times (1/4 + 1/2) / 2 of the update
    np.testing.assert_allclose(weights["w"], [1.125, 1.125])


def test_local_steps_cross_the_wire() -> None:
    header = UpdateHeader(round=3, num_samples=10, tensors=(), local_steps=17)
    assert serde.decode(UpdateHeader, serde.encode(header)).local_steps == 17


@pytest.mark.process
def test_a_simulation_with_unequal_local_steps_runs_fednova_from_the_reported_steps(
    tmp_path: object,
) -> None:
    from pathlib import Path

    ws = create_workspace(Path(str(tmp_path)) / "syn", "synthetic")
    overrides = ["sites=6", "rounds=3", "strategy.name=fednova", "evaluation.each_round=false"]
    plan = load_plan(ws, overrides)
    seen: list[Weights] = []
    result = simulate(ws, plan, SimulationOptions(workers=1))
    seen.append(result.final_weights)
    assert result.history and all(r.aggregated for r in result.history if r.kind.value == "train")
    # the synthetic sites hold different amounts of data: different step counts, each
    # reported by the task (SoftmaxRegression: one step a minibatch)
    steps = {r.site: r.local_steps for r in result.history[0].results}
    assert all(t > 0 for t in steps.values()) and len(set(steps.values())) > 1
    fedavg = simulate(ws, load_plan(ws, [*overrides[:-2], "evaluation.each_round=false"]))
    assert any(
        not np.array_equal(fedavg.final_weights[k], v) for k, v in result.final_weights.items()
    )
