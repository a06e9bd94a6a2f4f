"""The aggregation maths: hand-computed cases and properties against naive references."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.errors import AggregationError
from fedloom.strategies.aggregate import (
    adagrad_moments,
    adam_moments,
    adaptive_step,
    coordinate_median,
    fedavgm_step,
    initial_moments,
    krum,
    krum_scores,
    multi_krum,
    trimmed_mean,
    weighted_mean,
    yogi_moments,
)

PROPERTY = settings(max_examples=40, deadline=None)


def arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def assert_weights_close(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == np.float64
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-9)


def assert_weights_exact(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], np.asarray(want[name], dtype=np.float64))


# ---------------------------------------------------------------- naive references


def naive_weighted_mean(updates: list[dict], weights: list[float]) -> dict:
    out = {}
    for name in updates[0]:
        flat = [np.asarray(u[name], dtype=np.float64).ravel().tolist() for u in updates]
        values = []
        for c in range(len(flat[0])):
            values.append(sum(w * f[c] for w, f in zip(weights, flat, strict=True)) / sum(weights))
        out[name] = np.array(values).reshape(np.shape(updates[0][name]))
    return out


def naive_per_coordinate(updates: list[dict], reduce) -> dict:
    out = {}
    for name in updates[0]:
        flat = [np.asarray(u[name], dtype=np.float64).ravel().tolist() for u in updates]
        values = [reduce(sorted(f[c] for f in flat)) for c in range(len(flat[0]))]
        out[name] = np.array(values).reshape(np.shape(updates[0][name]))
    return out


def naive_median(column: list[float]) -> float:
    n = len(column)
    if n % 2:
        return column[n // 2]
    return (column[n // 2 - 1] + column[n // 2]) / 2


def naive_trimmed(k: int):
    def reduce(column: list[float]) -> float:
        kept = column[k : len(column) - k]
        return sum(kept) / len(kept)

    return reduce


def naive_krum_scores(updates: list[dict], f: int) -> list[float]:
    vectors = []
    for u in updates:
        vec: list[float] = []
        for a in u.values():
            vec.extend(np.asarray(a, dtype=np.float64).ravel().tolist())
        vectors.append(vec)
    scores = []
    for i, vi in enumerate(vectors):
        dists = []
        for j, vj in enumerate(vectors):
            if i != j:
                dists.append(sum((x - y) ** 2 for x, y in zip(vi, vj, strict=True)))
        scores.append(sum(sorted(dists)[: len(vectors) - f - 2]))
    return scores


# ---------------------------------------------------------------- generators

values64 = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
values32 = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def update_lists(draw, min_size: int = 1, max_size: int = 6) -> list[dict]:
    n = draw(st.integers(min_size, max_size))
    shape_a = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=3))
    shape_b = draw(hnp.array_shapes(min_dims=0, max_dims=1, max_side=3))
    return [
        {
            "a": draw(hnp.arrays(np.float64, shape_a, elements=values64)),
            "b": draw(hnp.arrays(np.float32, shape_b, elements=values32)),
        }
        for _ in range(n)
    ]


@st.composite
def updates_with_weights(draw) -> tuple[list[dict], list[float]]:
    updates = draw(update_lists())
    weights = draw(st.lists(st.integers(0, 1000), min_size=len(updates), max_size=len(updates)))
    if sum(weights) == 0:
        weights[0] = 1
    return updates, [float(w) for w in weights]


# ---------------------------------------------------------------- weighted_mean


def test_weighted_mean_by_hand() -> None:
    updates = [
        {"a": np.array([1, 2], dtype=np.float32), "b": np.array([[0.0]])},
        {"a": np.array([3, 4], dtype=np.float32), "b": np.array([[2.0]])},
    ]
    got = weighted_mean(updates, [1, 3])
    assert_weights_close(got, {"a": arr(2.5, 3.5), "b": np.array([[1.5]])})
    assert updates[0]["a"].dtype == np.float32  # inputs untouched
    np.testing.assert_array_equal(updates[0]["a"], [1, 2])


@pytest.mark.parametrize(
    "weights", [[0, 0], [1, -1], [1], [1, float("nan")]], ids=["zero", "neg", "len", "nan"]
)
def test_weighted_mean_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(AggregationError):
        weighted_mean([{"a": arr(1)}, {"a": arr(2)}], weights)


def test_inputs_must_agree() -> None:
    with pytest.raises(AggregationError, match="no updates"):
        coordinate_median([])
    with pytest.raises(AggregationError, match="shape"):
        coordinate_median([{"a": arr(1, 2)}, {"a": arr(1)}])
    with pytest.raises(AggregationError, match="no updates"):
        weighted_mean([], [])
    with pytest.raises(AggregationError, match="holds tensors"):
        weighted_mean([{"a": arr(1)}, {"b": arr(1)}], [1, 1])


@PROPERTY
@given(updates_with_weights())
def test_weighted_mean_matches_naive(data: tuple[list[dict], list[float]]) -> None:
    updates, weights = data
    assert_weights_close(weighted_mean(updates, weights), naive_weighted_mean(updates, weights))


@PROPERTY
@given(updates_with_weights(), st.data())
def test_weighted_mean_ignores_order(data: tuple[list[dict], list[float]], rnd) -> None:
    updates, weights = data
    order = rnd.draw(st.permutations(range(len(updates))))
    permuted = weighted_mean([updates[i] for i in order], [weights[i] for i in order])
    assert_weights_close(permuted, weighted_mean(updates, weights))


@PROPERTY
@given(updates_with_weights(), st.floats(1e-3, 1e3))
def test_weighted_mean_ignores_weight_scale(data, scale: float) -> None:
    updates, weights = data
    scaled = weighted_mean(updates, [w * scale for w in weights])
    assert_weights_close(scaled, weighted_mean(updates, weights))


@PROPERTY
@given(update_lists(max_size=1), st.integers(1, 5), st.lists(st.integers(1, 99), min_size=5))
def test_weighted_mean_of_copies_is_the_input(one, n: int, weights: list[int]) -> None:
    got = weighted_mean(one * n, weights[:n])
    assert_weights_close(got, one[0])


# ---------------------------------------------------------------- median and trimmed mean


def test_median_by_hand() -> None:
    odd = [{"a": arr(1, 5)}, {"a": arr(2, 0)}, {"a": arr(10, 1)}]
    assert_weights_exact(coordinate_median(odd), {"a": arr(2, 1)})
    even = [{"a": arr(1)}, {"a": arr(2)}, {"a": arr(3)}, {"a": arr(10)}]
    assert_weights_exact(coordinate_median(even), {"a": arr(2.5)})


def test_trimmed_mean_by_hand() -> None:
    updates = [{"a": arr(v, -v)} for v in (1, 2, 3, 4, 100)]
    assert_weights_exact(trimmed_mean(updates, 0.2), {"a": arr(3, -3)})  # drops 1 each end
    assert_weights_exact(trimmed_mean(updates, 0.1), {"a": arr(22, -22)})  # drops nothing
    three = updates[:3]
    assert_weights_exact(trimmed_mean(three, 0.5), {"a": arr(2, -2)})  # only the middle left


def test_trimmed_mean_refuses_to_trim_everything() -> None:
    with pytest.raises(AggregationError, match="leaves nothing"):
        trimmed_mean([{"a": arr(v)} for v in range(4)], 0.5)
    with pytest.raises(AggregationError, match="trim_fraction"):
        trimmed_mean([{"a": arr(1)}], -0.1)


@PROPERTY
@given(update_lists())
def test_median_matches_naive(updates: list[dict]) -> None:
    assert_weights_close(coordinate_median(updates), naive_per_coordinate(updates, naive_median))


@PROPERTY
@given(update_lists(), st.floats(0, 0.49))
def test_trimmed_mean_matches_naive(updates: list[dict], fraction: float) -> None:
    k = math.floor(fraction * len(updates))
    want = naive_per_coordinate(updates, naive_trimmed(k))
    assert_weights_close(trimmed_mean(updates, fraction), want)


@PROPERTY
@given(update_lists(), st.floats(0, 0.49), st.data())
def test_median_and_trimmed_mean_ignore_order(updates, fraction: float, rnd) -> None:
    permuted = rnd.draw(st.permutations(updates))
    assert_weights_exact(coordinate_median(permuted), coordinate_median(updates))
    assert_weights_exact(trimmed_mean(permuted, fraction), trimmed_mean(updates, fraction))


@PROPERTY
@given(update_lists(max_size=1), st.integers(1, 6), st.floats(0, 0.49))
def test_median_and_trimmed_mean_of_copies(one, n: int, fraction: float) -> None:
    assert_weights_exact(coordinate_median(one * n), one[0])
    assert_weights_close(trimmed_mean(one * n, fraction), one[0])


# ---------------------------------------------------------------- Krum


def two_tensor(a: float, b: float) -> dict:
    return {"a": arr(a), "b": np.array([[b]], dtype=np.float32)}


def test_krum_by_hand() -> None:
    # squared distances: d01=1 d02=4 d03=25 d12=5 d13=20 d23=13; f=0 keeps 2 nearest
    updates = [two_tensor(0, 0), two_tensor(1, 0), two_tensor(0, 2), two_tensor(3, 4)]
    np.testing.assert_array_equal(krum_scores(updates, 0), [5, 6, 9, 33])
    assert krum(updates, 0) == 0
    assert multi_krum(updates, 0, 3) == [0, 1, 2]


def test_krum_breaks_ties_by_lowest_index() -> None:
    updates = [two_tensor(x, 0) for x in (0, 1, 2, 3)]  # scores 5, 2, 2, 5
    assert krum(updates, 0) == 1
    assert multi_krum(updates, 0, 4) == [1, 2, 0, 3]


def test_krum_requirements() -> None:
    four = [two_tensor(x, 0) for x in range(4)]
    with pytest.raises(AggregationError, match="more than 2f \\+ 2 = 4"):
        krum(four, 1)
    with pytest.raises(AggregationError, match="no updates"):
        krum([], 0)
    with pytest.raises(AggregationError, match="shape"):
        krum_scores([*four[:3], {"a": arr(1, 2), "b": four[0]["b"]}], 0)
    with pytest.raises(AggregationError, match="cannot select"):
        multi_krum(four, 0, 5)
    with pytest.raises(AggregationError, match="cannot select"):
        multi_krum(four, 0, 0)


@PROPERTY
@given(update_lists(min_size=3), st.data())
def test_krum_scores_match_naive(updates: list[dict], rnd) -> None:
    f = rnd.draw(st.integers(0, (len(updates) - 3) // 2))
    np.testing.assert_allclose(krum_scores(updates, f), naive_krum_scores(updates, f), rtol=1e-9)


@PROPERTY
@given(update_lists(min_size=3), st.data())
def test_krum_ignores_order(updates: list[dict], rnd) -> None:
    f = rnd.draw(st.integers(0, (len(updates) - 3) // 2))
    order = rnd.draw(st.permutations(range(len(updates))))
    scores = krum_scores(updates, f)
    permuted_scores = krum_scores([updates[i] for i in order], f)
    np.testing.assert_array_equal(permuted_scores, scores[order])
    chosen = order[krum([updates[i] for i in order], f)]
    assert scores[chosen] == scores.min()
    if np.count_nonzero(scores == scores.min()) == 1:
        assert chosen == krum(updates, f)


@PROPERTY
@given(update_lists(max_size=1), st.integers(3, 6))
def test_krum_of_copies_picks_the_first(one, n: int) -> None:
    assert krum(one * n, 0) == 0
    np.testing.assert_array_equal(krum_scores(one * n, 0), np.zeros(n))


@PROPERTY
@given(st.integers(0, 2), st.integers(3, 5), st.data())
def test_krum_picks_the_honest_cluster(f: int, extra: int, rnd) -> None:
    honest_count = f + extra
    honest = rnd.draw(update_lists(min_size=honest_count, max_size=honest_count))
    liars = [
        {name: a + rnd.draw(st.sampled_from([-1e5, 1e5])) for name, a in honest[0].items()}
        for _ in range(f)
    ]
    order = rnd.draw(st.permutations(range(honest_count + f)))
    updates = [(honest + liars)[i] for i in order]
    honest_positions = {p for p, i in enumerate(order) if i < honest_count}
    assert krum(updates, f) in honest_positions
    assert set(multi_krum(updates, f, honest_count)) == honest_positions


# ---------------------------------------------------------------- server optimisers


def test_initial_moments() -> None:
    m, v = initial_moments({"a": np.ones((2, 1), dtype=np.float16)}, tau=1e-3)
    assert m["a"].dtype == v["a"].dtype == np.float64
    np.testing.assert_array_equal(m["a"], np.zeros((2, 1)))
    np.testing.assert_array_equal(v["a"], np.full((2, 1), 1e-6))


def test_fedavgm_step_by_hand() -> None:
    momentum, step = fedavgm_step(
        {"a": arr(0, 0)}, {"a": arr(1, 2)}, momentum_coef=0.9, server_lr=2.0
    )
    assert_weights_close(momentum, {"a": arr(1, 2)})
    assert_weights_close(step, {"a": arr(2, 4)})
    momentum, step = fedavgm_step(momentum, {"a": arr(0, 0)}, momentum_coef=0.9, server_lr=2.0)
    assert_weights_close(momentum, {"a": arr(0.9, 1.8)})
    assert_weights_close(step, {"a": arr(1.8, 3.6)})


def test_moments_by_hand() -> None:
    m, v, d = {"a": arr(0, 0)}, {"a": arr(1e-6, 10)}, {"a": arr(2, 1)}
    am, av = adam_moments(m, v, d, beta1=0.9, beta2=0.99)
    assert_weights_close(am, {"a": arr(0.2, 0.1)})
    assert_weights_close(av, {"a": arr(0.99e-6 + 0.04, 9.9 + 0.01)})
    ym, yv = yogi_moments(m, v, d, beta1=0.9, beta2=0.99)
    assert_weights_close(ym, am)
    assert_weights_close(yv, {"a": arr(1e-6 + 0.04, 10 - 0.01)})  # v < d**2 grows, v > shrinks
    gm, gv = adagrad_moments(m, v, d, beta1=0.9)
    assert_weights_close(gm, am)
    assert_weights_close(gv, {"a": arr(1e-6 + 4, 11)})
    np.testing.assert_array_equal(v["a"], arr(1e-6, 10))  # inputs untouched


def test_adaptive_step_by_hand() -> None:
    step = adaptive_step({"a": arr(0.2, -0.2)}, {"a": arr(0.04, 0.04)}, 0.1, 0.05)
    assert_weights_close(step, {"a": arr(0.08, -0.08)})
