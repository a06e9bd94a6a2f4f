"""Strategies across rounds against hand-rolled references, checkpointing and the registry."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from fedloom.core.errors import AggregationError, PlanError
from fedloom.core.records import (
    MeanSummary,
    RoundConfig,
    SiteResult,
    SiteUpdate,
    TrainSettings,
    UpdateSet,
)
from fedloom.core.weights import copy_weights, weights_equal
from fedloom.store import load_state, save_state
from fedloom.strategies import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    Strategy,
    StrategyState,
    TrimmedMean,
    build_strategy,
)

SITES = ("a", "b", "c", "d", "e")


def model() -> dict[str, np.ndarray]:
    return {
        "w": np.array([0.5, -1.0, 2.0], dtype=np.float32),
        "b": np.array([[0.25, 0.0], [1.0, -3.0]]),
    }


def round_deltas(round: int) -> list[dict[str, np.ndarray]]:
    """Five sites' updates for ``round``: four near each other, one far off."""
    rng = np.random.default_rng(round)
    deltas = [
        {name: rng.normal(0.1 * round, 0.1, a.shape).astype(a.dtype) for name, a in model().items()}
        for _ in SITES
    ]
    deltas[3] = {name: a + 50 for name, a in deltas[3].items()}
    return deltas


SAMPLES = (10, 30, 20, 5, 15)


def results(round: int, n: int) -> tuple[SiteResult, ...]:
    # each site's local steps: one per 10 samples (FedNova reads them; the others ignore them)
    return tuple(
        SiteResult(s, round, k, k, {}, k // 10 + 1)
        for s, k in zip(SITES[:n], SAMPLES[:n], strict=True)
    )


def mean_summary(round: int, deltas: list[dict[str, np.ndarray]]) -> MeanSummary:
    n = len(deltas)
    total = float(sum(SAMPLES[:n]))
    mean = {
        name: sum(k * d[name].astype(np.float64) for k, d in zip(SAMPLES[:n], deltas, strict=True))
        / total
        for name in deltas[0]
    }
    return MeanSummary(round, mean, total, results(round, n))


def update_set(round: int, deltas: list[dict[str, np.ndarray]]) -> UpdateSet:
    updates = tuple(SiteUpdate(s, k, d) for s, k, d in zip(SITES, SAMPLES, deltas, strict=False))
    return UpdateSet(round, updates, results(round, len(deltas)))


def summary_for(strategy: Strategy, round: int, deltas: list) -> MeanSummary | UpdateSet:
    return update_set(round, deltas) if strategy.needs_updates else mean_summary(round, deltas)


def run(strategy: Strategy, rounds: int = 3) -> list[dict[str, np.ndarray]]:
    """The global model after each round, checking that inputs are never modified."""
    state = strategy.init(model())
    history = []
    for r in range(1, rounds + 1):
        deltas = round_deltas(r)
        summary = summary_for(strategy, r, deltas)
        old = state
        weights_before = copy_weights(old.weights)
        arrays_before = {g: copy_weights(a) for g, a in old.arrays.items()}
        state, weights = strategy.aggregate(r, state, summary, [])
        assert weights is state.weights
        assert state.scalars["step"] == r
        assert weights_equal(old.weights, weights_before)
        assert all(weights_equal(old.arrays[g], a) for g, a in arrays_before.items())
        assert all(
            weights_equal(d, fresh) for d, fresh in zip(deltas, round_deltas(r), strict=True)
        )
        history.append(weights)
    return history


def apply(reference: dict[str, np.ndarray], step: dict[str, np.ndarray]) -> None:
    for name, a in reference.items():
        reference[name] = (a.astype(np.float64) + step[name]).astype(a.dtype)


def assert_history(history: list[dict], reference: list[dict]) -> None:
    for got, want in zip(history, reference, strict=True):
        for name in want:
            assert got[name].dtype == want[name].dtype
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- mean-based, by hand


def reference_run(server_step) -> list[dict]:
    """Apply ``server_step(round, mean_delta)`` each round to a copy of the model."""
    weights, out = model(), []
    for r in (1, 2, 3):
        apply(weights, server_step(r, mean_summary(r, round_deltas(r)).mean_delta))
        out.append(dict(weights))
    return out


def test_fedavg_and_fedprox_add_the_mean() -> None:
    want = reference_run(lambda r, d: d)
    assert_history(run(FedAvg()), want)
    assert_history(run(FedProx(proximal_mu=0.3)), want)


def test_fedavgm_keeps_momentum() -> None:
    buf = {name: np.zeros(a.shape) for name, a in model().items()}

    def step(r: int, d: dict) -> dict:
        for name in buf:
            buf[name] = 0.5 * buf[name] + d[name]
        return {name: 2.0 * b for name, b in buf.items()}

    assert_history(run(FedAvgM(server_lr=2.0, momentum=0.5)), reference_run(step))


def scalar_reference(kind: str, lr: float, b1: float, b2: float, tau: float):
    """Reddi et al.'s Algorithm 2, coordinate by coordinate with Python floats."""
    moments: dict[tuple[str, int], tuple[float, float]] = {}

    def step(r: int, d: dict) -> dict:
        out = {}
        for name, arr in d.items():
            flat = []
            for i, x in enumerate(np.ravel(arr).tolist()):
                m, v = moments.get((name, i), (0.0, tau * tau))
                m = b1 * m + (1 - b1) * x
                if kind == "adam":
                    v = b2 * v + (1 - b2) * x * x
                elif kind == "yogi":
                    v = v - (1 - b2) * x * x * math.copysign(1.0, v - x * x) * (v != x * x)
                else:
                    v = v + x * x
                moments[(name, i)] = (m, v)
                flat.append(lr * m / (math.sqrt(v) + tau))
            out[name] = np.array(flat).reshape(np.shape(arr))
        return out

    return step


@pytest.mark.parametrize(
    ("strategy", "kind", "b2"),
    [
        (FedAdam(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2), "adam", 0.95),
        (FedYogi(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2), "yogi", 0.95),
        (FedAdagrad(server_lr=0.05, beta1=0.8, tau=1e-2), "adagrad", 0.0),
    ],
    ids=["adam", "yogi", "adagrad"],
)
def test_adaptive_strategies_follow_reddi(strategy: Strategy, kind: str, b2: float) -> None:
    assert_history(run(strategy), reference_run(scalar_reference(kind, 0.05, 0.8, b2, 1e-2)))
    state = strategy.init(model())
    assert set(state.arrays) == {"m", "v"}
    np.testing.assert_array_equal(state.arrays["v"]["w"], np.full(3, 1e-4))


# ---------------------------------------------------------------- robust, by hand


def robust_reference(reduce) -> list[dict]:
    weights, out = model(), []
    for r in (1, 2, 3):
        deltas = round_deltas(r)
        step = {}
        for name in weights:
            stacked = np.stack([d[name].astype(np.float64) for d in deltas])
            step[name] = np.apply_along_axis(reduce, 0, stacked)
        apply(weights, step)
        out.append(dict(weights))
    return out


def test_median_and_trimmed_mean() -> None:
    assert_history(run(Median()), robust_reference(lambda c: sorted(c)[2]))
    # 5 sites, trim 0.2: drop one value at each end
    assert_history(
        run(TrimmedMean(trim_fraction=0.2)), robust_reference(lambda c: np.mean(sorted(c)[1:4]))
    )
    assert_history(run(TrimmedMean()), robust_reference(lambda c: c.mean()))  # 0.1*5 -> none


def krum_reference(f: int, select: int) -> list[dict]:
    weights, out = model(), []
    for r in (1, 2, 3):
        deltas = round_deltas(r)
        vecs = [np.concatenate([a.astype(np.float64).ravel() for a in d.values()]) for d in deltas]
        scores = []
        for i, vi in enumerate(vecs):
            distances = sorted(float(((vi - vj) ** 2).sum()) for j, vj in enumerate(vecs) if j != i)
            scores.append(sum(distances[: 5 - f - 2]))
        chosen = sorted(range(5), key=lambda i: (scores[i], i))[:select]
        assert 3 not in chosen  # the outlier is never picked
        total = sum(SAMPLES[i] for i in chosen)
        step = {
            n: sum(SAMPLES[i] * deltas[i][n].astype(np.float64) for i in chosen) / total
            for n in weights
        }
        apply(weights, step)
        out.append(dict(weights))
    return out


def test_krum_and_multi_krum() -> None:
    assert_history(run(Krum()), krum_reference(1, 1))
    assert_history(run(MultiKrum()), krum_reference(1, 4))
    assert_history(run(MultiKrum(num_byzantine=0, num_selected=2)), krum_reference(0, 2))


def test_krum_needs_enough_sites() -> None:
    state = Krum(num_byzantine=1).init(model())
    with pytest.raises(AggregationError, match="2f \\+ 2"):
        Krum(num_byzantine=1).aggregate(1, state, update_set(1, round_deltas(1)[:4]), [])


# ---------------------------------------------------------------- every strategy


ALL = [cls() for cls in STRATEGIES.values()]
IDS = list(STRATEGIES)


def fit(state: StrategyState, deltas: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """``deltas`` laid out as the state's global model: a zero update of each tensor a
    strategy keeps in it besides the model's own (SCAFFOLD's control variates)."""
    return [{n: d.get(n, np.zeros_like(a)) for n, a in state.weights.items()} for d in deltas]


def test_registry_names() -> None:
    assert {name: cls.name for name, cls in STRATEGIES.items()} == {n: n for n in STRATEGIES}
    buffering = {name for name, cls in STRATEGIES.items() if cls.needs_updates}
    assert buffering == {
        "fednova",  # not robust: it needs each update to normalise it by its local steps
        "median",
        "trimmed-mean",
        "krum",
        "multi-krum",
        "geometric-median",
        "filtered-mean",
    }


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_state_round_trips(strategy: Strategy, tmp_path: Path) -> None:
    state = strategy.init(model())
    state, _ = strategy.aggregate(
        1, state, summary_for(strategy, 1, fit(state, round_deltas(1))), []
    )
    save_state(tmp_path / "state.safetensors", state)
    loaded = load_state(tmp_path / "state.safetensors")
    assert weights_equal(loaded.weights, state.weights)
    assert list(loaded.arrays) == list(state.arrays)
    for group in state.arrays:
        assert weights_equal(loaded.arrays[group], state.arrays[group])
    assert dict(loaded.scalars) == dict(state.scalars)
    summary = summary_for(strategy, 2, fit(state, round_deltas(2)))
    _, from_memory = strategy.aggregate(2, state, summary, [])
    _, from_disk = strategy.aggregate(2, loaded, summary, [])
    assert weights_equal(from_memory, from_disk)


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_empty_round_changes_nothing(strategy: Strategy) -> None:
    state = strategy.init(model())
    empty = UpdateSet(1, (), ()) if strategy.needs_updates else MeanSummary(1, {}, 0.0, ())
    new_state, weights = strategy.aggregate(1, state, empty, [])
    assert new_state is state
    assert weights is state.weights


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_wrong_summary_kind_or_round_is_refused(strategy: Strategy) -> None:
    state = strategy.init(model())
    deltas = fit(state, round_deltas(1))
    wrong = mean_summary(1, deltas) if strategy.needs_updates else update_set(1, deltas)
    with pytest.raises(AggregationError, match=strategy.name):
        strategy.aggregate(1, state, wrong, [])
    with pytest.raises(AggregationError, match="round 2"):
        strategy.aggregate(2, state, summary_for(strategy, 1, deltas), [])


@pytest.mark.parametrize("strategy", ALL, ids=IDS)
def test_dtypes_of_the_global_model_are_kept(strategy: Strategy) -> None:
    start = {
        "h": np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float16),
        "n": np.array([7, 100], dtype=np.int64),
    }
    state = strategy.init(start)
    deltas = [
        {"h": np.full(4, 0.1 * (i + 1), dtype=np.float16), "n": np.array([2, -3], dtype=np.int64)}
        for i in range(5)
    ]
    for r in (1, 2):
        summary = summary_for(strategy, r, fit(state, deltas))
        state, weights = strategy.aggregate(r, state, summary, [])
        model_dtypes = {k: a.dtype for k, a in weights.items() if not k.startswith("fedloom.")}
        assert model_dtypes == {"h": np.float16, "n": np.int64}
    assert start["n"].tolist() == [7, 100]  # init copied, nothing written back


def test_integer_tensors_are_rounded() -> None:
    start = {"n": np.array([10], dtype=np.int64)}
    summary = MeanSummary(1, {"n": np.array([1.6])}, 1.0, results(1, 1))
    _, weights = FedAvg().aggregate(1, FedAvg().init(start), summary, [])
    assert weights["n"].tolist() == [12]


def test_configure() -> None:
    state, plan = StrategyState(weights=model()), TrainSettings(epochs=3, lr=0.2)
    assert FedProx().configure(1, state, plan) == RoundConfig(replace(plan, proximal_mu=0.01))
    assert FedProx(proximal_mu=0.5).configure(3, state, plan).settings.proximal_mu == 0.5
    for strategy in ALL:
        if strategy.name != "fedprox":
            assert strategy.configure(1, state, plan) == RoundConfig(plan)


# ---------------------------------------------------------------- build_strategy


def test_build_strategy() -> None:
    assert build_strategy("fedadam", {"server_lr": 0.1}) == FedAdam(server_lr=0.1)
    assert build_strategy("multi-krum", {"num_selected": 3}) == MultiKrum(num_selected=3)
    assert build_strategy("fedavg", {}) == FedAvg()


def test_build_strategy_reports_every_problem() -> None:
    with pytest.raises(PlanError) as err:
        build_strategy("fedadam", {"server_lr": -1, "beta1": 2, "momentum": 0.9})
    problems = err.value.problems
    assert len(problems) == 3
    assert any(p == "strategy.server_lr: must be > 0 (got -1)" for p in problems)
    assert any("beta1" in p for p in problems)
    assert any("has no parameter 'momentum'" in p for p in problems)


def test_build_strategy_unknown_name() -> None:
    with pytest.raises(PlanError, match="unknown strategy 'fedsgd'") as err:
        build_strategy("fedsgd", {})
    for name in STRATEGIES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fedavgm", {"momentum": 1.0}),
        ("fedprox", {"proximal_mu": float("nan")}),
        ("trimmed-mean", {"trim_fraction": 0.5}),
        ("krum", {"num_byzantine": -1}),
        ("multi-krum", {"num_selected": 0}),
        ("fedyogi", {"tau": 0}),
    ],
)
def test_build_strategy_range_checks(name: str, params: dict) -> None:
    with pytest.raises(PlanError, match=next(iter(params))):
        build_strategy(name, params)


# ---------------------------------------------------------------- server optimisers


def test_a_server_optimiser_is_pure_and_fedadam_is_fedavg_with_one() -> None:
    """FedAvg composed with the adaptive optimiser and Adam's moments moves the model
    bit for bit as FedAdam does; ``apply`` changes nothing it is given."""
    import functools

    from fedloom.strategies.aggregate import adam_moments
    from fedloom.strategies.optimizers import ServerOptimizer, adaptive

    @dataclass(frozen=True, kw_only=True)
    class AdamByHand(FedAvg):
        def optimizer(self) -> ServerOptimizer:
            moments = functools.partial(adam_moments, beta1=0.8, beta2=0.95)
            return adaptive(moments, server_lr=0.05, tau=1e-2)

    ours, theirs = AdamByHand(), FedAdam(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)
    a, b = ours.init(model()), theirs.init(model())
    for rnd in (1, 2, 3):
        summary = mean_summary(rnd, round_deltas(rnd))
        before = {g: copy_weights(arrays) for g, arrays in a.arrays.items()}
        a, _ = ours.aggregate(rnd, a, summary, [])
        b, _ = theirs.aggregate(rnd, b, summary, [])
        assert weights_equal(a.weights, b.weights)
        assert all(weights_equal(a.arrays[g], b.arrays[g]) for g in ("m", "v"))
        assert all(not weights_equal(before[g], a.arrays[g]) for g in before)  # new arrays
    optimizer = theirs.optimizer()
    kept = optimizer.init(model())
    frozen = {g: copy_weights(arrays) for g, arrays in kept.items()}
    optimizer.apply(kept, mean_summary(1, round_deltas(1)).mean_delta)
    assert all(weights_equal(kept[g], frozen[g]) for g in kept)
