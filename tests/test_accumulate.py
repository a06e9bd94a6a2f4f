"""Streaming accumulation: exact, order-free sums, and refusals that change nothing."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.accumulate import MeanAccumulator, UpdateBuffer, make_accumulator
from fedloom.errors import UpdateRejected
from fedloom.records import MeanSummary
from fedloom.weights import TensorSpec, Weights, specs_of, weights_equal

PROPERTY = settings(max_examples=50, deadline=None)

BF16 = np.dtype(ml_dtypes.bfloat16)
SPECS = (
    TensorSpec("w", "float32", (3, 4)),
    TensorSpec("h", "bfloat16", (2,)),
    TensorSpec("i", "int64", (2,)),
)
MAX_SITES = 6


def update_for(seed: int, scale: float = 1.0) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.normal(0, scale, (3, 4))).astype(np.float32),
        "h": (rng.normal(0, scale, (2,))).astype(BF16),
        "i": rng.integers(-100, 100, (2,)).astype(np.int64),
    }


updates_strategy = st.lists(
    st.tuples(
        st.integers(1, 10_000),
        st.lists(st.floats(-1e3, 1e3, width=32), min_size=12, max_size=12),
        st.lists(st.floats(-1e3, 1e3, width=32), min_size=2, max_size=2),
        st.lists(st.integers(-(10**6), 10**6), min_size=2, max_size=2),
    ).map(
        lambda t: (
            t[0],
            {
                "w": np.array(t[1], dtype=np.float32).reshape(3, 4),
                "h": np.array(t[2], dtype=np.float32).astype(BF16),
                "i": np.array(t[3], dtype=np.int64),
            },
        )
    ),
    min_size=1,
    max_size=MAX_SITES,
)


def fold_all(updates: list[tuple[int, Weights]], order: list[int]) -> MeanSummary:
    acc = MeanAccumulator(SPECS, max_sites=MAX_SITES)
    for index in order:
        weight, delta = updates[index]
        acc.fold(f"site-{index}", weight, delta)
    summary = acc.summary(1, ())
    assert isinstance(summary, MeanSummary)
    return summary


def reference_mean(updates: list[tuple[int, Weights]]) -> dict[str, np.ndarray]:
    total = sum(w for w, _ in updates)
    return {
        s.name: sum(w * d[s.name].astype(np.float64) for w, d in updates) / total for s in SPECS
    }


@PROPERTY
@given(updates=updates_strategy, data=st.data())
def test_mean_is_independent_of_fold_order(
    updates: list[tuple[int, Weights]], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(updates))))
    first = fold_all(updates, list(range(len(updates))))
    second = fold_all(updates, list(order))
    assert first.total_weight == second.total_weight == sum(w for w, _ in updates)
    for spec in SPECS:
        assert first.mean_delta[spec.name].tobytes() == second.mean_delta[spec.name].tobytes()


@PROPERTY
@given(updates=updates_strategy)
def test_mean_matches_the_float64_weighted_mean(updates: list[tuple[int, Weights]]) -> None:
    summary = fold_all(updates, list(range(len(updates))))
    want = reference_mean(updates)
    for spec in SPECS:
        got = summary.mean_delta[spec.name]
        assert got.dtype == np.float64 and got.shape == spec.shape
        assert np.max(np.abs(got - want[spec.name]), initial=0.0) <= 2**-24


def test_integer_tensors_average_exactly() -> None:
    specs = (TensorSpec("count", "int64", (3,)),)
    acc = MeanAccumulator(specs, max_sites=2)
    acc.fold("a", 1, {"count": np.array([2, -7, 10**9], dtype=np.int64)})
    acc.fold("b", 3, {"count": np.array([6, 1, 10**9], dtype=np.int64)})
    mean = acc.summary(1, ()).mean_delta["count"]
    np.testing.assert_array_equal(mean, [5.0, -1.0, 1e9])


def test_zero_dimensional_tensors_fold() -> None:
    # a step counter or a scalar temperature is a 0-d tensor in a real model
    specs = (TensorSpec("steps", "int64", ()), TensorSpec("temperature", "float32", ()))
    acc = MeanAccumulator(specs, max_sites=2)
    acc.fold("a", 1, {"steps": np.array(1, np.int64), "temperature": np.array(0.5, np.float32)})
    acc.fold("b", 3, {"steps": np.array(5, np.int64), "temperature": np.array(1.5, np.float32)})
    mean = acc.summary(1, ()).mean_delta
    assert mean["steps"] == 4.0 and mean["temperature"] == 1.25


def test_nothing_folded_gives_zeros() -> None:
    summary = MeanAccumulator(SPECS, max_sites=2).summary(4, ())
    assert summary.round == 4 and summary.total_weight == 0
    for spec in SPECS:
        np.testing.assert_array_equal(summary.mean_delta[spec.name], np.zeros(spec.shape))


def snapshot(acc: MeanAccumulator) -> tuple:
    summary = acc.summary(1, ())
    return (
        acc.count,
        acc.total_weight,
        summary.total_weight,
        tuple(summary.mean_delta[s.name].tobytes() for s in SPECS),
    )


def with_value(name: str, index: tuple[int, ...], value: float) -> Weights:
    delta = update_for(9)
    delta[name] = delta[name].copy()
    delta[name][index] = value
    return delta


def reshaped(name: str, shape: tuple[int, ...]) -> Weights:
    delta = update_for(9)
    delta[name] = np.zeros(shape, dtype=delta[name].dtype)
    return delta


def retyped(name: str, dtype: np.dtype) -> Weights:
    delta = update_for(9)
    delta[name] = delta[name].astype(dtype)
    return delta


def dropped(name: str) -> Weights:
    return {k: v for k, v in update_for(9).items() if k != name}


REFUSED = {
    "nan": ("c", 5, with_value("w", (1, 2), np.nan), ["'w'", "NaN"]),
    "inf-bfloat16": ("c", 5, with_value("h", (1,), -np.inf), ["'h'", "NaN or Inf"]),
    "wrong-shape": ("c", 5, reshaped("w", (4, 3)), ["'w'", "(4, 3)"]),
    "wrong-dtype": ("c", 5, retyped("w", np.dtype(np.float64)), ["'w'", "float64"]),
    "bfloat16-as-float32": ("c", 5, retyped("h", np.dtype(np.float32)), ["'h'", "float32"]),
    "missing-tensor": ("c", 5, dropped("h"), ["missing ['h']"]),
    "extra-tensor": ("c", 5, {**update_for(9), "x": np.zeros(1)}, ["unexpected ['x']"]),
    "reordered": ("c", 5, dict(reversed(list(update_for(9).items()))), ["different order"]),
    "duplicate-site": ("a", 5, update_for(9), ["'a'", "already"]),
    "zero-weight": ("c", 0, update_for(9), ["positive", "0"]),
    "negative-weight": ("c", -5, update_for(9), ["positive", "-5"]),
    # out of range in the last tensor: earlier tensors must not have been added
    "too-large-int": ("c", 1, with_value("i", (1,), 2**50), ["'i'", "fixed-point range"]),
    "too-large-weight": ("c", 2**40, update_for(9), ["fixed-point range"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_update_leaves_the_sums_unchanged(case: str) -> None:
    site, weight, delta, words = REFUSED[case]
    acc = MeanAccumulator(SPECS, max_sites=4)
    acc.fold("a", 2, update_for(1))
    acc.fold("b", 3, update_for(2))
    before = snapshot(acc)
    with pytest.raises(UpdateRejected) as info:
        acc.fold(site, weight, delta)
    for word in words:
        assert word in info.value.message
    assert snapshot(acc) == before
    # and the sums still take a good update as if nothing had happened
    acc.fold("d", 4, update_for(3))
    fresh = MeanAccumulator(SPECS, max_sites=4)
    for s, w, seed in (("a", 2, 1), ("b", 3, 2), ("d", 4, 3)):
        fresh.fold(s, w, update_for(seed))
    assert snapshot(acc) == snapshot(fresh)


def test_more_updates_than_sites_are_refused() -> None:
    acc = MeanAccumulator(SPECS, max_sites=2)
    acc.fold("a", 1, update_for(1))
    acc.fold("b", 1, update_for(2))
    before = snapshot(acc)
    with pytest.raises(UpdateRejected, match="more than 2 updates"):
        acc.fold("c", 1, update_for(3))
    assert snapshot(acc) == before


def test_update_buffer_orders_updates_by_site_name() -> None:
    buffer = UpdateBuffer(SPECS)
    folded = {"carol": (3, update_for(3)), "alice": (1, update_for(1)), "bob": (2, update_for(2))}
    for site, (weight, delta) in folded.items():
        buffer.fold(site, weight, delta)
    summary = buffer.summary(2, ())
    assert summary.round == 2
    assert [u.site for u in summary.updates] == ["alice", "bob", "carol"]
    for update in summary.updates:
        weight, delta = folded[update.site]
        assert update.num_samples == weight
        assert weights_equal(update.delta, delta)
    assert buffer.count == 3 and buffer.total_weight == 6


@pytest.mark.parametrize("case", ["nan", "wrong-shape", "duplicate-site", "zero-weight"])
def test_update_buffer_refuses_what_the_mean_refuses(case: str) -> None:
    site, weight, delta, words = REFUSED[case]
    buffer = UpdateBuffer(SPECS)
    buffer.fold("a", 2, update_for(1))
    with pytest.raises(UpdateRejected) as info:
        buffer.fold(site, weight, delta)
    for word in words:
        assert word in info.value.message
    assert [u.site for u in buffer.summary(1, ()).updates] == ["a"]


def test_make_accumulator_follows_needs_updates() -> None:
    specs = specs_of(update_for(0))
    assert isinstance(make_accumulator(specs, needs_updates=False, max_sites=3), MeanAccumulator)
    assert isinstance(make_accumulator(specs, needs_updates=True, max_sites=3), UpdateBuffer)


@pytest.mark.parametrize("magnitude", [1e-12, 1e-8, 1e-4, 1.0, 1e3])
def test_precision_is_relative_down_to_tiny_updates(magnitude: float) -> None:
    rng = np.random.default_rng(7)
    spec = (TensorSpec("w", "float32", (64,)),)
    acc = MeanAccumulator(spec, max_sites=10)
    deltas = [(rng.normal(size=64) * magnitude).astype(np.float32) for _ in range(10)]
    weights = [int(w) for w in rng.integers(1, 5000, size=10)]
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        acc.fold(f"site-{i}", w, {"w": d})
    reference = sum(
        np.float64(w) * d.astype(np.float64) for d, w in zip(deltas, weights, strict=True)
    )
    reference = reference / sum(weights)
    got = acc.summary(1, ()).mean_delta["w"]
    # exact to 2**-64 of each weighted value: float64-level precision at any magnitude
    np.testing.assert_allclose(got, reference, rtol=1e-12, atol=len(deltas) * 2.0**-64)
