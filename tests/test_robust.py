"""Robust aggregation that needs no count of attackers: the geometric median (RFA) and the
filtered mean around it; the plan's warnings for robust strategies set for fewer attackers
than attack; and the message when updates explode."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from workspaces import make_workspace, run_cli

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.core.errors import AggregationError, PlanError, QuorumError
from fedloom.core.records import CloseReason, FailureKind, SiteUpdate, UpdateSet
from fedloom.plan import attack_warnings
from fedloom.strategies import FilteredMean, GeometricMedian, build_strategy
from fedloom.strategies.aggregate import geometric_median, near_centre, weighted_mean

PROPERTY = settings(max_examples=30, deadline=None)
TIGHT = {"max_iterations": 2000, "tolerance": 1e-10}


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def flat(update: dict) -> list[float]:
    out: list[float] = []
    for a in update.values():
        out.extend(np.asarray(a, dtype=np.float64).ravel().tolist())
    return out


def norm(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def naive_objective(updates: list[dict], shares: list[float], z: list[float]) -> float:
    return sum(a * norm(flat(u), z) for a, u in zip(shares, updates, strict=True))


def naive_weiszfeld(updates: list[dict], shares: list[float], iterations: int) -> list[float]:
    """Weiszfeld's steps in plain Python, from the coordinate-wise median (for updates in
    general position: none is ever met on the way)."""
    vectors = [flat(u) for u in updates]
    z = [float(np.median([v[c] for v in vectors])) for c in range(len(vectors[0]))]
    for _ in range(iterations):
        dists = [norm(v, z) for v in vectors]
        if not any(dists):
            break
        b = [a / d for a, d in zip(shares, dists, strict=True)]
        z = [
            sum(bi * v[c] for bi, v in zip(b, vectors, strict=True)) / sum(b) for c in range(len(z))
        ]
    return z


values = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


@st.composite
def update_lists(draw, min_size: int = 1, max_size: int = 7) -> list[dict]:
    n = draw(st.integers(min_size, max_size))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=3))
    return [
        {
            "a": draw(hnp.arrays(np.float64, shape, elements=values)),
            "b": draw(hnp.arrays(np.float32, (2,), elements=values.map(np.float32))),
        }
        for _ in range(n)
    ]


# ---------------------------------------------------------------- geometric median


@st.composite
def scattered(draw) -> list[dict]:
    """2 to 7 updates in general position (no two alike, no three on a line)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(2, 7))
    scale = draw(st.floats(0.01, 100))
    return [{"a": rng.normal(0, scale, (2, 2)), "b": rng.normal(0, scale, 3)} for _ in range(n)]


def test_geometric_median_by_hand() -> None:
    # three corners of a square and its centre: the centre is the geometric median
    updates = [{"a": arr(0, 0)}, {"a": arr(2, 0)}, {"a": arr(0, 2)}, {"a": arr(2, 2)}]
    got = geometric_median(updates, **TIGHT)
    np.testing.assert_allclose(got["a"], [1, 1], atol=1e-9)
    # on a line the geometric median is the median, whatever the outlier
    line = [{"a": arr(v)} for v in (0.0, 1.0, 1e9)]
    np.testing.assert_allclose(geometric_median(line, **TIGHT)["a"], [1.0], atol=1e-6)
    # a weight over half the total wins outright
    got = geometric_median([{"a": arr(0.0)}, {"a": arr(5.0)}], [3, 1], **TIGHT)
    np.testing.assert_allclose(got["a"], [0.0], atol=1e-6)


def test_geometric_median_refuses_bad_input() -> None:
    with pytest.raises(AggregationError, match="no updates"):
        geometric_median([])
    with pytest.raises(AggregationError, match="shape"):
        geometric_median([{"a": arr(1, 2)}, {"a": arr(1)}])
    with pytest.raises(AggregationError, match="sum to zero"):
        geometric_median([{"a": arr(1)}, {"a": arr(2)}], [0, 0])
    with pytest.raises(AggregationError, match="tolerance must be >= 0"):
        geometric_median([{"a": arr(1)}], tolerance=-1)


@PROPERTY
@given(scattered(), st.data())
def test_geometric_median_matches_naive_weiszfeld(updates: list[dict], data: Any) -> None:
    n = len(updates)
    weights = data.draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    shares = [w / sum(weights) for w in weights]
    got = flat(geometric_median(updates, weights, max_iterations=10, tolerance=0))
    want = naive_weiszfeld(updates, shares, 10)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(map(abs, want)))


@PROPERTY
@given(update_lists())
def test_geometric_median_minimises_the_sum_of_distances(updates: list[dict]) -> None:
    shares = [1 / len(updates)] * len(updates)
    z = flat(geometric_median(updates, **TIGHT))
    best = naive_objective(updates, shares, z)
    mean = flat(weighted_mean(updates, [1.0] * len(updates)))
    for candidate in [*(flat(u) for u in updates), mean]:
        assert best <= naive_objective(updates, shares, candidate) * (1 + 1e-7) + 1e-9


@PROPERTY
@given(update_lists(), st.data())
def test_geometric_median_ignores_order(updates: list[dict], data: Any) -> None:
    permuted = data.draw(st.permutations(updates))
    got, want = geometric_median(permuted, **TIGHT), geometric_median(updates, **TIGHT)
    scale = 1 + max(abs(v) for v in [*flat(updates[0]), 0.0])
    np.testing.assert_allclose(flat(got), flat(want), atol=1e-6 * scale)


@PROPERTY
@given(update_lists(max_size=1), st.integers(1, 6))
def test_geometric_median_of_copies_is_the_input(one: list[dict], n: int) -> None:
    got = geometric_median(one * n)
    for name, a in one[0].items():
        assert got[name].dtype == np.float64
        np.testing.assert_array_equal(got[name], a.astype(np.float64))


@PROPERTY
@given(scattered(), st.floats(0.01, 100), st.floats(-50, 50))
def test_geometric_median_moves_with_its_inputs(updates: list[dict], k: float, c: float) -> None:
    """Scaling and shifting every update scales and shifts the median; scaling the
    weights changes nothing."""
    base = flat(geometric_median(updates, **TIGHT))
    moved = [{name: a * k + c for name, a in u.items()} for u in updates]
    spread = max(abs(v) for u in updates for v in flat(u))
    np.testing.assert_allclose(
        flat(geometric_median(moved, **TIGHT)),
        [k * v + c for v in base],
        atol=1e-6 * (spread * k + abs(c)),
    )
    weighted = flat(geometric_median(updates, [7.0] * len(updates), **TIGHT))
    np.testing.assert_allclose(weighted, base, atol=1e-6 * spread)


@PROPERTY
@given(st.integers(3, 9), st.data())
def test_geometric_median_withstands_a_minority(n: int, data: Any) -> None:
    """Fewer than half the updates anywhere: the median stays within Minsker's bound
    ``(1 - a) / sqrt(1 - 2 a) * r`` of the centre ``c`` of the others (a ball of radius r)."""
    bad = data.draw(st.integers(0, (n - 1) // 2))
    centre = data.draw(hnp.arrays(np.float64, (4,), elements=values))
    offsets = data.draw(
        st.lists(
            hnp.arrays(np.float64, (4,), elements=st.floats(-1, 1)),
            min_size=n - bad,
            max_size=n - bad,
        )
    )
    far = data.draw(st.lists(st.sampled_from([-1e6, 1e6, 3e4]), min_size=bad, max_size=bad))
    honest = [{"a": centre + o} for o in offsets]
    liars = [{"a": centre + f * np.arange(1.0, 5.0)} for f in far]
    r = max(float(np.linalg.norm(o)) for o in offsets)
    assume(r > 1e-3)
    alpha = bad / n
    bound = (1 - alpha) / math.sqrt(1 - 2 * alpha) * r
    got = geometric_median(honest + liars, **TIGHT)["a"]
    assert float(np.linalg.norm(got - centre)) <= bound * (1 + 1e-6) + 1e-6


# ---------------------------------------------------------------- near_centre


def test_near_centre_by_hand() -> None:
    updates = [{"a": arr(v)} for v in (1.0, -1.0, 2.0, -5.0, 30.0)]  # median distance 2
    assert near_centre(updates, {"a": arr(0.0)}, 1.0) == [0, 1, 2]
    assert near_centre(updates, {"a": arr(0.0)}, 2.5) == [0, 1, 2, 3]
    assert near_centre(updates, {"a": arr(0.0)}, 15.0) == [0, 1, 2, 3, 4]
    with pytest.raises(AggregationError, match="radius must be finite and >= 1"):
        near_centre(updates, {"a": arr(0.0)}, 0.5)
    with pytest.raises(AggregationError, match="holds tensors"):
        near_centre(updates, {"b": arr(0.0)}, 2.0)


@PROPERTY
@given(update_lists(), st.floats(1, 10), st.data())
def test_near_centre_keeps_half_and_ignores_order(updates: list[dict], radius, data) -> None:
    centre = {name: np.zeros(np.shape(a)) for name, a in updates[0].items()}
    kept = near_centre(updates, centre, radius)
    assert len(kept) >= math.ceil(len(updates) / 2)
    order = data.draw(st.permutations(range(len(updates))))
    permuted = near_centre([updates[i] for i in order], centre, radius)
    assert sorted(order[i] for i in permuted) == kept


# ---------------------------------------------------------------- the strategies


def update_set(deltas: list[dict], samples: list[int]) -> UpdateSet:
    sites = [f"site-{i}" for i in range(len(deltas))]
    updates = tuple(SiteUpdate(s, k, d) for s, k, d in zip(sites, samples, deltas, strict=True))
    return UpdateSet(1, updates, ())


def test_filtered_mean_leaves_out_far_updates_and_weights_the_rest() -> None:
    # 7 honest updates in 100 dimensions (their distances to the centre all close),
    # and 3 attackers sending -10 x theirs, claiming the largest sample count
    start = {"w": np.zeros(100, dtype=np.float32)}
    rng = np.random.default_rng(0)
    honest = [{"w": (np.ones(100) + rng.normal(0, 0.5, 100)).astype(np.float32)} for _ in range(7)]
    attackers = [{"w": (-10 * h["w"]).astype(np.float32)} for h in honest[:3]]
    samples = [10, 20, 30, 40, 50, 60, 70, 100_000, 100_000, 100_000]
    strategy = FilteredMean()
    state = strategy.init(start)
    _, weights = strategy.aggregate(1, state, update_set(honest + attackers, samples), [])
    want = weighted_mean(honest, samples[:7])["w"]
    np.testing.assert_allclose(weights["w"], want, rtol=1e-6)
    # no far update: it is FedAvg's sample-weighted mean
    _, clean = strategy.aggregate(1, state, update_set(honest, samples[:7]), [])
    np.testing.assert_allclose(clean["w"], want, rtol=1e-6)


def test_geometric_median_strategy_counts_sites_or_samples() -> None:
    start = {"w": np.zeros(1)}
    deltas = [{"w": arr(0.0)}, {"w": arr(1.0)}, {"w": arr(2.0)}]
    samples = [1, 1, 10]
    by_site = GeometricMedian()
    _, weights = by_site.aggregate(1, by_site.init(start), update_set(deltas, samples), [])
    np.testing.assert_allclose(weights["w"], [1.0], atol=1e-5)
    by_samples = GeometricMedian(sample_weighted=True)
    _, weights = by_samples.aggregate(1, by_samples.init(start), update_set(deltas, samples), [])
    np.testing.assert_allclose(weights["w"], [2.0], atol=1e-5)


def test_new_strategies_in_the_plan() -> None:
    assert build_strategy("filtered-mean", {"radius": 3}) == FilteredMean(radius=3.0)
    with pytest.raises(PlanError, match="radius"):
        build_strategy("filtered-mean", {"radius": 0.5})
    with pytest.raises(PlanError, match="max_iterations"):
        build_strategy("geometric-median", {"max_iterations": 0})
    assert GeometricMedian().tolerated(10) == FilteredMean().tolerated(10) == 4


# ---------------------------------------------------------------- plan warnings


def plan_of(tmp_path: Path, *overrides: str) -> Any:
    ws = make_workspace(tmp_path, "breast-cancer")
    return load_plan(ws, ["sites=10", *overrides])


@pytest.mark.parametrize(
    ("overrides", "starts"),
    [
        (["strategy.name=fedavg"], "strategy.name: fedavg averages every update"),
        (["strategy.name=fedadam"], "strategy.name: fedadam averages every update"),
        (["strategy.name=trimmed-mean"], "strategy.trim_fraction: 0.1 trims 1 of the 10"),
        (["strategy.name=krum"], "strategy.num_byzantine: krum withstands num_byzantine = 1"),
        (["strategy.name=multi-krum"], "strategy.num_byzantine: multi-krum withstands"),
        (
            ["strategy.name=multi-krum", "strategy.num_byzantine=3", "strategy.num_selected=8"],
            "strategy.num_selected: multi-krum keeps 8 of the 10 updates",
        ),
    ],
)
def test_plan_warns_when_the_strategy_withstands_fewer_attackers(
    tmp_path: Path, overrides: list[str], starts: str
) -> None:
    plan = plan_of(tmp_path, *overrides)
    (warning,) = attack_warnings(plan, 3)
    assert warning.startswith(starts)
    assert "3 of the 10 sites in a round attack" in warning
    assert attack_warnings(plan, 0) == ()


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy.name=median"],
        ["strategy.name=geometric-median"],
        ["strategy.name=filtered-mean"],
        ["strategy.name=trimmed-mean", "strategy.trim_fraction=0.3"],
        ["strategy.name=krum", "strategy.num_byzantine=3"],
        ["strategy.name=multi-krum", "strategy.num_byzantine=3"],
        ["strategy.name=fedavg", "sites_per_round=3", "sites=10"],  # warned: see below
    ],
)
def test_plan_does_not_warn_a_strategy_that_holds(tmp_path: Path, overrides: list[str]) -> None:
    plan = plan_of(tmp_path, *overrides)
    if plan.strategy.name == "fedavg":
        assert len(attack_warnings(plan, 1)) == 1  # a mean withstands no attacker at all
        assert attack_warnings(plan, 0) == ()
        return
    assert attack_warnings(plan, 3) == ()


def test_plan_warns_that_half_the_sites_are_too_many(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, "strategy.name=filtered-mean", "sites_per_round=6")
    (warning,) = attack_warnings(plan, 5)
    assert "5 of the 6 sites in a round attack: no robust strategy withstands half" in warning
    assert attack_warnings(plan, 2) == ()


@pytest.mark.process
def test_plan_show_and_simulate_print_the_warning(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    shown = run_cli("plan", "show", str(ws), "sites=10", "strategy.name=krum", "--attackers", "3")
    assert shown.returncode == 0, shown.stderr
    assert "plan hash" in shown.stdout
    assert "warning: strategy.num_byzantine: krum withstands num_byzantine = 1" in " ".join(
        shown.stderr.split()
    )
    ran = run_cli(
        "simulate", str(ws), "--sites", "4", "--rounds", "1", "--workers", "0", "--quiet",
        "--attack", "sign-flip", "--attackers", "1", "evaluation.final=false",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "warning: strategy.name: fedavg averages every update" in " ".join(ran.stderr.split())


# ---------------------------------------------------------------- updates that explode


def exploding(shift_runner: Any, index: int) -> Any:
    class Exploding(shift_runner):  # type: ignore[misc, valid-type]
        @classmethod
        def delta_like(cls, weights: Any, index: int, round: int) -> Any:
            honest = super().delta_like(weights, index, round)
            return {
                name: (a * np.float32(1e12)).astype(a.dtype) if a.dtype == np.float32 else a
                for name, a in honest.items()
            }

    return Exploding(index, 10)


FOUR = ("site-a", "site-b", "site-c", "site-d")


def test_exploded_updates_are_named_when_they_stop_the_round(
    make_federation: Any, shift_runner: Any, tiny_weights: Any
) -> None:
    fed = make_federation(tiny_weights, roster=FOUR, sites_per_round=4, min_fraction=0.75)
    fed.start_site("site-a", shift_runner(0, 10))
    fed.start_site("site-b", shift_runner(1, 10))
    fed.start_site("site-c", exploding(shift_runner, 2))
    fed.start_site("site-d", exploding(shift_runner, 3))
    fed.start()
    with pytest.raises(QuorumError) as info:
        fed.finish()
    assert info.value.exit_code == 7
    message = str(info.value)
    assert message.startswith(
        "round 1: the updates of site-c, site-d exploded (too large to add up) and were refused;"
    ), message
    # the attempt closes once quorum is out of reach: the honest sites' answers may or may
    # not have arrived by then
    assert re.search(r"\b[0-2] of 4 sites answered", message), message
    assert "robust strategy (strategy.name=filtered-mean)" in message


def test_an_exploded_update_is_a_rejection_naming_it(
    make_federation: Any, shift_runner: Any, tiny_weights: Any
) -> None:
    fed = make_federation(tiny_weights, roster=FOUR, sites_per_round=4, min_fraction=0.5, rounds=1)
    fed.start_site("site-a", shift_runner(0, 10))
    fed.start_site("site-b", shift_runner(1, 10))
    fed.start_site("site-c", exploding(shift_runner, 2))
    fed.start_site("site-d", shift_runner(3, 10))
    fed.start()
    history = fed.finish()
    trained = history[0]
    assert trained.close_reason is CloseReason.QUORUM
    (failure,) = trained.failures
    assert (failure.site, failure.kind) == ("site-c", FailureKind.REJECTED)
    assert failure.reason.startswith("the update exploded: tensor 'w'")
    assert "beyond the fixed-point range" in failure.reason


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_filtered_mean_holds_against_30_percent_attackers(tmp_path: Path) -> None:
    """Digits, 10 IID sites, 3 of them sending -10 x their update: the filtered mean
    stays within 2 points of clean FedAvg (the plain geometric median and the median
    lose more here; docs/strategies.md has the numbers)."""
    ws = make_workspace(tmp_path, "digits")
    base = ["sites=10", "data.partition=iid", "rounds=10", "seed=0"]

    def accuracy(strategy: str, attack: str | None) -> float:
        plan = load_plan(ws, [*base, f"strategy.name={strategy}"])
        options = SimulationOptions(workers=0, attack=attack, attackers=3 if attack else 0)
        result = simulate(ws, plan, options)
        assert len(result.attackers) == (3 if attack else 0)
        return float(result.test_metrics["accuracy"])

    clean = accuracy("fedavg", None)
    assert clean >= 0.9
    held = accuracy("filtered-mean", "scale:-10")
    assert held >= clean - 0.02, f"filtered-mean under scale:-10: {held:.4f} vs clean {clean:.4f}"
