"""Streaming accumulation: exact, order-free sums, and refusals that change nothing."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import SpoolWatch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.accumulate import MeanAccumulator, UpdateBuffer, make_accumulator
from fedloom.accumulate import mean as mean_module
from fedloom.accumulate.limbs import encode_limbs
from fedloom.core.errors import AggregationError, UpdateRejected
from fedloom.core.records import MeanSummary
from fedloom.core.weights import TensorSpec, Weights, specs_of, weights_equal

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
        narrow = spec.dtype in ("float32", "float16", "bfloat16")
        assert got.dtype == (np.float32 if narrow else np.float64) and got.shape == spec.shape
        # the exact sum's mean, rounded once to float32 for narrow floats
        rounding = np.abs(want[spec.name]) * 2.0**-24 if narrow else 0.0
        assert np.all(np.abs(got - want[spec.name]) <= 2**-24 + rounding)


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


def internals(acc: MeanAccumulator) -> tuple:
    """Everything the accumulator holds, as bytes: every limb sum, count and weight."""
    sums = acc.fixed_point_sums()
    limbs = tuple((name, tuple(limb.tobytes() for limb in sums[name])) for name in sums)
    return limbs, acc.count, acc.total_weight


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
    # out of range in the last tensor: earlier tensors must not have been added (integer
    # tensors need no fractional bits, so their range is 2**62 / max_sites)
    "too-large-int": ("c", 1, with_value("i", (1,), 2**61), ["'i'", "fixed-point range"]),
    "too-large-weight": ("c", 2**40, update_for(9), ["fixed-point range"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_update_leaves_the_sums_unchanged(case: str) -> None:
    site, weight, delta, words = REFUSED[case]
    acc = MeanAccumulator(SPECS, max_sites=4)
    acc.fold("a", 2, update_for(1))
    acc.fold("b", 3, update_for(2))
    before = internals(acc)
    with pytest.raises(UpdateRejected) as info:
        acc.fold(site, weight, delta)
    for word in words:
        assert word in info.value.message
    assert internals(acc) == before
    # and the sums still take a good update as if nothing had happened
    acc.fold("d", 4, update_for(3))
    fresh = MeanAccumulator(SPECS, max_sites=4)
    for s, w, seed in (("a", 2, 1), ("b", 3, 2), ("d", 4, 3)):
        fresh.fold(s, w, update_for(seed))
    assert internals(acc) == internals(fresh)


def test_more_updates_than_sites_are_refused() -> None:
    acc = MeanAccumulator(SPECS, max_sites=2)
    acc.fold("a", 1, update_for(1))
    acc.fold("b", 1, update_for(2))
    before = internals(acc)
    with pytest.raises(UpdateRejected, match="more than 2 updates"):
        acc.fold("c", 1, update_for(3))
    assert internals(acc) == before


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
def test_float64_precision_is_relative_down_to_tiny_updates(magnitude: float) -> None:
    # float64 tensors keep the two-limb layout: 64 fractional bits
    rng = np.random.default_rng(7)
    spec = (TensorSpec("w", "float64", (64,)),)
    acc = MeanAccumulator(spec, max_sites=10)
    deltas = [rng.normal(size=64) * magnitude for _ in range(10)]
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


# ------------------------------------------------------------------ streaming

STREAM_SPECS = (
    TensorSpec("w", "float32", (3, 4)),
    TensorSpec("d", "float64", (5,)),
    TensorSpec("h", "bfloat16", (2,)),
    TensorSpec("i", "int64", (2,)),
    TensorSpec("empty", "float32", (0,)),
    TensorSpec("steps", "int32", ()),
)


def stream_update(seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(0, 3, (3, 4)).astype(np.float32),
        "d": rng.normal(0, 1e-3, (5,)),
        "h": rng.normal(0, 1, (2,)).astype(BF16),
        "i": rng.integers(-1000, 1000, (2,)).astype(np.int64),
        "empty": np.zeros((0,), np.float32),
        "steps": np.array(rng.integers(0, 50), dtype=np.int32),
    }


def chunks_of(delta: Weights, elements: int) -> list[tuple[int, int, bytes]]:
    """``(tensor, offset, data)`` chunks of ``elements`` values each (empty tensors: one)."""
    out = []
    for index, array in enumerate(delta.values()):
        data = np.ascontiguousarray(array).tobytes()
        step = max(1, elements) * array.itemsize
        if not data:
            out.append((index, 0, b""))
        out += [(index, at, data[at : at + step]) for at in range(0, len(data), step)]
    return out


def stream(acc: MeanAccumulator | UpdateBuffer, site: str, weight: int, delta: Weights, n: int):
    contribution = acc.begin(site, weight)
    for tensor, offset, data in chunks_of(delta, n):
        contribution.add(tensor, offset, data)
    contribution.finish()


streamed_sites = st.lists(
    st.tuples(st.integers(0, 2**16), st.integers(1, 5000), st.integers(1, 13)),
    min_size=1,
    max_size=MAX_SITES,
    unique_by=lambda t: t[0],
)


@PROPERTY
@given(sites=streamed_sites, data=st.data())
def test_chunk_sizes_and_site_order_do_not_change_the_sum(
    sites: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    whole = MeanAccumulator(STREAM_SPECS, max_sites=MAX_SITES)
    for seed, weight, _ in sites:
        whole.fold(f"site-{seed}", weight, stream_update(seed))
    streamed = MeanAccumulator(STREAM_SPECS, max_sites=MAX_SITES)
    for seed, weight, elements in data.draw(st.permutations(sites)):
        stream(streamed, f"site-{seed}", weight, stream_update(seed), elements)

    assert internals(streamed) == internals(whole)
    got, want = streamed.summary(1, ()), whole.summary(1, ())
    assert got.total_weight == want.total_weight
    for spec in STREAM_SPECS:
        assert got.mean_delta[spec.name].tobytes() == want.mean_delta[spec.name].tobytes()


@PROPERTY
@given(sites=streamed_sites, seed=st.integers(0, 2**16), data=st.data())
def test_a_stream_aborted_part_way_leaves_the_accumulator_bit_identical(
    sites: list[tuple[int, int, int]], seed: int, data: st.DataObject
) -> None:
    acc = MeanAccumulator(STREAM_SPECS, max_sites=MAX_SITES + 1)
    for s, weight, _ in sites:
        acc.fold(f"site-{s}", weight, stream_update(s))
    before = internals(acc)
    chunks = chunks_of(stream_update(seed), data.draw(st.integers(1, 7)))
    taken = data.draw(st.integers(0, len(chunks)))
    contribution = acc.begin("late", data.draw(st.integers(1, 10**6)))
    for tensor, offset, chunk in chunks[:taken]:
        contribution.add(tensor, offset, chunk)
    if taken == len(chunks):  # complete but not committed: still undone
        assert internals(acc)[0] != before[0] or not any(c for _, _, c in chunks)
    contribution.abort("round 1 closed while the update streamed")
    assert internals(acc) == before
    # the site may send again, and counts as if the aborted stream never was
    acc.fold("late", 3, stream_update(seed))
    fresh = MeanAccumulator(STREAM_SPECS, max_sites=MAX_SITES + 1)
    for s, weight, _ in sites:
        fresh.fold(f"site-{s}", weight, stream_update(s))
    fresh.fold("late", 3, stream_update(seed))
    assert internals(acc) == internals(fresh)


def two_sites() -> MeanAccumulator:
    acc = MeanAccumulator(STREAM_SPECS, max_sites=4)
    acc.fold("a", 2, stream_update(1))
    acc.fold("b", 3, stream_update(2))
    return acc


def test_truncated_stream_is_rejected_and_rolled_back() -> None:
    acc = two_sites()
    before = internals(acc)
    contribution = acc.begin("c", 5)
    for tensor, offset, data in chunks_of(stream_update(3), 1)[:-3]:  # all but i[1:], empty, steps
        contribution.add(tensor, offset, data)
    assert internals(acc) != before
    with pytest.raises(UpdateRejected, match=r"stream ended early: tensor 'i' has 8 of 16 bytes"):
        contribution.finish()
    assert internals(acc) == before


@pytest.mark.parametrize("make", [two_sites, lambda: UpdateBuffer(STREAM_SPECS)])
def test_check_complete_refuses_a_truncated_stream_without_rolling_back(make) -> None:
    acc = make()
    before = internals(acc) if isinstance(acc, MeanAccumulator) else None
    contribution = acc.begin("c", 5)
    chunks = chunks_of(stream_update(3), 1)
    for tensor, offset, data in chunks[:-3]:  # all but i[1:], empty, steps
        contribution.add(tensor, offset, data)
    partial = internals(acc) if isinstance(acc, MeanAccumulator) else None
    for _ in range(2):  # it only looks: asking again changes nothing
        with pytest.raises(UpdateRejected, match=r"stream ended early: tensor 'i' has 8 of 16"):
            contribution.check_complete()
    if isinstance(acc, MeanAccumulator):
        assert partial != before and internals(acc) == partial  # not rolled back
    for tensor, offset, data in chunks[-3:]:  # the stream may still go on
        contribution.add(tensor, offset, data)
    contribution.check_complete()
    contribution.finish()
    assert acc.count == (3 if isinstance(acc, MeanAccumulator) else 1)


def test_check_complete_after_an_abort_gives_the_abort_reason() -> None:
    acc = two_sites()
    before = internals(acc)
    contribution = acc.begin("c", 5)
    contribution.add(0, 0, np.ones(12, np.float32).tobytes())
    contribution.abort("round 2 closed while the update streamed")
    with pytest.raises(UpdateRejected, match="round 2 closed while the update streamed"):
        contribution.check_complete()
    assert internals(acc) == before


def test_chunk_beyond_the_announced_size_is_rejected_and_rolled_back() -> None:
    acc = two_sites()
    before = internals(acc)
    contribution = acc.begin("c", 5)
    contribution.add(1, 0, np.zeros(5).tobytes())
    with pytest.raises(UpdateRejected, match=r"tensor 'd' is larger than announced \(40 bytes\)"):
        contribution.add(1, 40, np.zeros(1).tobytes())
    assert internals(acc) == before


@pytest.mark.parametrize(
    ("offset", "expected"),
    [(16, "chunk at byte 16, expected 8"), (0, "chunk at byte 0, expected 8")],
)
def test_chunk_out_of_order_is_rejected_and_rolled_back(offset: int, expected: str) -> None:
    acc = two_sites()
    before = internals(acc)
    contribution = acc.begin("c", 5)
    contribution.add(0, 0, np.ones(2, np.float32).tobytes())
    with pytest.raises(UpdateRejected, match=f"tensor 'w': {expected}"):
        contribution.add(0, offset, np.ones(2, np.float32).tobytes())
    assert internals(acc) == before


def test_chunk_that_splits_a_value_is_rejected() -> None:
    acc = two_sites()
    before = internals(acc)
    contribution = acc.begin("c", 5)
    with pytest.raises(UpdateRejected, match="'d': a chunk of 12 bytes splits a 8-byte float64"):
        contribution.add(1, 0, b"\x00" * 12)
    assert internals(acc) == before


def test_chunk_for_an_unknown_tensor_is_rejected() -> None:
    contribution = two_sites().begin("c", 5)
    with pytest.raises(UpdateRejected, match="tensor #6, but only 6 exist"):
        contribution.add(6, 0, b"")


def test_nan_in_the_second_chunk_rolls_back_the_first() -> None:
    acc = two_sites()
    before = internals(acc)
    contribution = acc.begin("c", 7)
    values = np.arange(12, dtype=np.float32)
    values[9] = np.nan
    contribution.add(0, 0, values[:6].tobytes())
    assert internals(acc)[0] != before[0]  # the first chunk was folded
    with pytest.raises(UpdateRejected, match="tensor 'w' holds 1 NaN or Inf values"):
        contribution.add(0, 24, values[6:].tobytes())
    assert internals(acc) == before
    # the refusal ended the stream: nothing more is taken
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        contribution.add(0, 24, np.zeros(6, np.float32).tobytes())
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        contribution.finish()
    assert internals(acc) == before and acc.count == 2


def test_abort_is_idempotent_and_final() -> None:
    acc = two_sites()
    before = internals(acc)
    contribution = acc.begin("c", 5)
    contribution.add(0, 0, np.ones(12, np.float32).tobytes())
    contribution.abort("round 4 closed while the update streamed")
    contribution.abort("another reason")
    assert internals(acc) == before
    for call in (lambda: contribution.add(1, 0, np.ones(5).tobytes()), contribution.finish):
        with pytest.raises(UpdateRejected, match="round 4 closed while the update streamed"):
            call()
    done = acc.begin("d", 5)
    for tensor, offset, data in chunks_of(stream_update(4), 100):
        done.add(tensor, offset, data)
    done.finish()
    after = internals(acc)
    done.abort("too late")  # a committed update stays
    assert internals(acc) == after and acc.count == 3


def test_streams_in_flight_count_towards_max_sites_and_block_the_summary() -> None:
    acc = MeanAccumulator(STREAM_SPECS, max_sites=2)
    first = acc.begin("a", 1)
    acc.begin("b", 1)
    with pytest.raises(UpdateRejected, match="more than 2 updates"):
        acc.begin("c", 1)
    with pytest.raises(UpdateRejected, match="'a' is already sending"):
        acc.begin("a", 1)
    with pytest.raises(AggregationError, match="2 update.s. still streaming"):
        acc.summary(1, ())
    first.abort()
    acc.begin("c", 1)  # the aborted stream freed its place


def arrays_in(obj: object) -> list[np.ndarray]:
    """Every numpy array that ``obj``'s attributes hold (through lists, tuples, dicts)."""
    found: list[np.ndarray] = []
    todo: list[object] = [vars(obj)]
    while todo:
        item = todo.pop()
        if isinstance(item, np.ndarray):
            found.append(item)
        elif isinstance(item, dict):
            todo += item.values()
        elif isinstance(item, list | tuple | set | frozenset):
            todo += item
    return found


def test_summary_frees_each_tensors_limbs_once_its_mean_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acc = two_sites()
    held = [weakref.ref(array) for array in arrays_in(acc)]
    # one limb per tensor, two for the float64 one ("d"), none for the bfloat16 one ("h":
    # summed from the spools when its mean is read)
    assert len(held) == 6
    alive: list[int] = []
    decode = mean_module.decode_limbs

    def watched(spec: TensorSpec, limbs: tuple[np.ndarray, ...]) -> np.ndarray:
        alive.append(sum(ref() is not None for ref in held))
        return decode(spec, limbs)

    monkeypatch.setattr(mean_module, "decode_limbs", watched)
    acc.summary(1, ())
    # when a tensor is decoded, only its limbs and those of the tensors after it live
    assert alive == [6, 5, 3, 2, 1]
    assert arrays_in(acc) == [] and all(ref() is None for ref in held)


def test_summary_decodes_the_limb_sums_as_documented() -> None:
    sums, weight = two_sites().fixed_point_sums(), 5.0
    mean = two_sites().summary(1, ()).mean_delta
    for spec in STREAM_SPECS:
        limbs = [limb.astype(np.float64) for limb in sums[spec.name]]
        if len(limbs) == 2:
            total = (limbs[0] + limbs[1] / 2.0**40) / 2.0**24
        else:
            total = limbs[0] / (2.0**32 if spec.dtype in ("float32", "bfloat16") else 1.0)
        want = (total / weight).reshape(spec.shape)
        if spec.dtype in ("float32", "float16", "bfloat16"):
            want = want.astype(np.float32)  # narrow floats: rounded once to float32
        assert mean[spec.name].tobytes() == want.tobytes()


def test_summary_consumes_the_accumulator() -> None:
    acc = two_sites()
    acc.summary(3, ())
    with pytest.raises(AggregationError, match="sums of round 3 were released"):
        acc.summary(3, ())
    with pytest.raises(AggregationError, match=r"summary\(\) consumes the accumulator"):
        acc.fixed_point_sums()
    for late in (lambda: acc.begin("c", 1), lambda: acc.fold("c", 1, stream_update(3))):
        with pytest.raises(UpdateRejected, match="round 3 was already read: .*'c' came too late"):
            late()
    assert acc.count == 2 and acc.total_weight == 5  # what was folded is still known


def test_abort_from_another_thread_while_the_stream_is_blocked() -> None:
    acc = two_sites()
    before = internals(acc)
    chunks = chunks_of(stream_update(3), 2)
    stalled, release = threading.Event(), threading.Event()
    offered: list[int] = []

    def network() -> Iterator[tuple[int, int, bytes]]:
        yield from chunks[:3]
        stalled.set()  # the first three chunks were folded
        release.wait(10)
        for chunk in chunks[3:]:
            offered.append(chunk[1])
            yield chunk

    contribution = acc.begin("c", 5)
    errors: list[UpdateRejected] = []

    def receive() -> None:
        try:
            for tensor, offset, data in network():
                contribution.add(tensor, offset, data)
            contribution.finish()
        except UpdateRejected as err:
            errors.append(err)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    assert stalled.wait(10)
    assert internals(acc) != before
    contribution.abort("round 1 closed while the update streamed")  # does not wait for it
    assert internals(acc) == before
    release.set()
    receiver.join(10)
    assert not receiver.is_alive()
    assert [e.message for e in errors] == ["round 1 closed while the update streamed"]
    assert len(offered) == 1  # the first chunk after the abort was refused
    assert internals(acc) == before


def test_abort_recomputes_from_a_spool_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mean_module, "_SPOOL_BYTES", 64)  # the spool rolls over to a file
    acc = two_sites()
    before = internals(acc)
    contribution = acc.begin("c", 5)
    for tensor, offset, data in chunks_of(stream_update(3), 3):
        contribution.add(tensor, offset, data)
    contribution.abort()
    assert internals(acc) == before


@pytest.mark.parametrize("end", ["finish", "abort"])
def test_a_spool_beyond_memory_goes_to_spool_dir_and_is_gone_at_the_end(
    end: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spool_watch: SpoolWatch
) -> None:
    # the spool rolls over to a file (a model with a bfloat16 tensor keeps its spools
    # until the round's mean is read: _KEPT_SPOOL_BYTES)
    monkeypatch.setattr(mean_module, "_KEPT_SPOOL_BYTES", 64)
    acc = MeanAccumulator(STREAM_SPECS, max_sites=4, spool_dir=tmp_path)
    acc.fold("a", 2, stream_update(1))
    assert spool_watch.on_disk_in(tmp_path) == 1  # a's, kept for the bfloat16 tensor's sum
    before = internals(acc)
    contribution = acc.begin("c", 5)
    chunks = chunks_of(stream_update(3), 3)
    for tensor, offset, data in chunks[:2]:  # 24 bytes: still in memory
        contribution.add(tensor, offset, data)
    assert spool_watch.on_disk_in(tmp_path) == 1
    for tensor, offset, data in chunks[2:]:  # 112 bytes in all: beyond the limit
        contribution.add(tensor, offset, data)
    assert spool_watch.on_disk_in(tmp_path) == 2
    if end == "finish":
        contribution.finish()
        assert acc.count == 2 and spool_watch.on_disk_in(tmp_path) == 2
        summary = acc.summary(1, ())
        assert summary.mean_delta["h"].dtype == np.float32
        del summary  # the mean is read and dropped: the spools go with it
    else:
        contribution.abort()
        assert internals(acc) == before and spool_watch.on_disk_in(tmp_path) == 1
        del acc, contribution  # a mean never read: the spools go with the accumulator
    assert spool_watch.on_disk_in(tmp_path) == 0 and spool_watch.all_closed()


def test_a_spool_really_lands_in_spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # no such folder: the roll-over to a file there fails, so that is where it goes
    monkeypatch.setattr(mean_module, "_KEPT_SPOOL_BYTES", 64)
    missing = tmp_path / "missing"
    acc = MeanAccumulator(STREAM_SPECS, max_sites=4, spool_dir=missing)
    before = internals(acc)
    contribution = acc.begin("c", 5)
    with pytest.raises(FileNotFoundError) as err:
        for tensor, offset, data in chunks_of(stream_update(3), 3):
            contribution.add(tensor, offset, data)
    assert str(missing) in str(err.value.filename)
    assert internals(acc) == before  # the chunks folded before it are rolled back
    assert list(tmp_path.iterdir()) == []


def test_make_accumulator_passes_spool_dir_to_the_mean(tmp_path: Path) -> None:
    specs = specs_of(update_for(0))
    mean = make_accumulator(specs, needs_updates=False, max_sites=3, spool_dir=tmp_path)
    assert isinstance(mean, MeanAccumulator) and mean.spool_dir == tmp_path
    assert isinstance(make_accumulator(specs, needs_updates=True, max_sites=3), UpdateBuffer)


def test_float32_single_limb_mean_is_within_its_bound() -> None:
    rng = np.random.default_rng(11)
    specs = (TensorSpec("w", "float32", (4096,)),)
    n = 8
    acc = MeanAccumulator(specs, max_sites=n)
    deltas = [
        (rng.normal(size=4096) * 10.0 ** rng.integers(-6, 2)).astype(np.float32) for _ in range(n)
    ]
    weights = [int(w) for w in rng.integers(1, 3, size=n)]  # small weights: the worst case
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        acc.fold(f"site-{i}", w, {"w": d})
    total = sum(weights)
    reference = sum(w * d.astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / total
    mean = acc.summary(1, ()).mean_delta["w"]
    assert mean.dtype == np.float32
    # the documented fixed-point bound, plus the one rounding of the mean to float32
    bound = n * 2.0**-33 / total * (1 + 2**-40) + np.abs(reference) * 2.0**-24
    assert np.all(np.abs(mean - reference) <= bound)


def test_float32_range_is_2_to_the_30_over_max_sites() -> None:
    acc = MeanAccumulator((TensorSpec("w", "float32", (2,)),), max_sites=4)
    acc.fold("a", 1, {"w": np.array([2.0**28 * 0.99, -1], np.float32)})
    with pytest.raises(UpdateRejected, match="'w'.*beyond the fixed-point range 2.68e.08 for 4"):
        acc.fold("b", 2, {"w": np.array([2.0**27, 0], np.float32)})


def test_update_buffer_streams_checks_and_rolls_back() -> None:
    whole, streamed = UpdateBuffer(STREAM_SPECS), UpdateBuffer(STREAM_SPECS)
    for site, seed, elements in (("b", 2, 1), ("a", 1, 5)):
        whole.fold(site, seed, stream_update(seed))
        stream(streamed, site, seed, stream_update(seed), elements)
    got, want = streamed.summary(1, ()), whole.summary(1, ())
    assert [u.site for u in got.updates] == ["a", "b"]
    for g, w in zip(got.updates, want.updates, strict=True):
        assert g.num_samples == w.num_samples and weights_equal(g.delta, w.delta)

    bad = streamed.begin("c", 1)
    bad.add(2, 0, np.array([1.0], np.float32).astype(BF16).tobytes())
    with pytest.raises(UpdateRejected, match="tensor 'h' holds 1 NaN or Inf"):
        bad.add(2, 2, np.array([np.inf], np.float32).astype(BF16).tobytes())
    truncated = streamed.begin("d", 1)
    truncated.add(0, 0, np.zeros(3, np.float32).tobytes())
    with pytest.raises(UpdateRejected, match="tensor 'w' has 12 of 48 bytes"):
        truncated.finish()
    aborted = streamed.begin("e", 1)
    aborted.add(3, 0, np.zeros(2, np.int64).tobytes())
    aborted.abort()
    assert [u.site for u in streamed.summary(1, ()).updates] == ["a", "b"]
    assert streamed.count == 2 and streamed.total_weight == 3


# ---------------------------------------------------------------- the codec


def reference_encode(
    name: str, limb_count: int, values: np.ndarray, weight: int, max_sites: int
) -> tuple[np.ndarray, ...]:
    """The float path of the codec as first written (separate finite and abs passes)."""
    x = values.astype(np.float64)
    if not np.isfinite(x).all():
        raise UpdateRejected(f"tensor {name!r} holds NaN or Inf values")
    x *= float(weight)
    two = limb_count == 2
    bound = 2.0**62 / max_sites / (2.0**24 if two else 2.0**32)
    if x.size and float(np.max(np.abs(x))) >= bound:
        raise UpdateRejected(f"tensor {name!r}: beyond the fixed-point range")
    if two:
        x *= 2.0**24
        hi = np.floor(x)
        return hi.astype(np.int64), np.rint((x - hi) * 2.0**40).astype(np.int64)
    return (np.rint(x * 2.0**32).astype(np.int64),)


@pytest.mark.parametrize(
    ("dtype", "limb_count"), [("float64", 2), ("float32", 1), ("float16", 1), ("bfloat16", 1)]
)
def test_encode_gives_the_limbs_of_the_reference_bit_for_bit(dtype: str, limb_count: int) -> None:
    rng = np.random.default_rng(5)
    native = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    max_sites, weight = 4, 1000
    bound = 2.0**62 / max_sites / (2.0**24 if limb_count == 2 else 2.0**32) / weight
    edge = min(bound * 0.999, float(ml_dtypes.finfo(native).max))  # float16 ends first
    values = np.concatenate(
        [
            rng.normal(size=200) * 10.0 ** rng.integers(-12, 3, size=200),
            [0.0, -0.0, 1.0, -1.0, 2.0**-30, -(2.0**-30), edge, -edge],
        ]
    ).astype(native)
    got = encode_limbs("w", limb_count, values, weight, max_sites)
    want = reference_encode("w", limb_count, values, weight, max_sites)
    assert len(got) == len(want) == limb_count
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.int64 and g.tobytes() == w.tobytes()
    assert encode_limbs("w", limb_count, values[:0], weight, max_sites)[0].size == 0


ENCODE_REFUSED = {
    "nan": ("float32", [1.0, np.nan, 2.0], 1, "'w' holds 1 NaN or Inf values"),
    "inf": ("float32", [np.inf, -np.inf], 1, "'w' holds 2 NaN or Inf values"),
    "bfloat16-inf": ("bfloat16", [0.5, -np.inf], 1, "'w' holds 1 NaN or Inf values"),
    "float64-nan": ("float64", [np.nan], 1, "'w' holds 1 NaN or Inf values"),
    # both faults in one chunk: the NaN is what is reported, as before
    "nan-and-too-large": ("float32", [1e30, np.nan], 1, "'w' holds 1 NaN or Inf values"),
    "too-large": ("float32", [1.0, -(2.0**29)], 1, "'w': |weight x update| reaches 5.37e+08"),
    "too-large-by-weight": ("float64", [1.0, 0.5], 2**40, "beyond the fixed-point range"),
    # finite values whose weighted product overflows float64: out of range, not NaN/Inf
    "product-overflows": ("float64", [1e300, 0.0], 2**40, "reaches inf, beyond the fixed"),
}


@pytest.mark.parametrize("case", list(ENCODE_REFUSED))
def test_encode_says_whether_a_value_is_nan_or_inf_or_out_of_range(case: str) -> None:
    dtype, values, weight, words = ENCODE_REFUSED[case]
    native = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    array = np.array(values, dtype=np.float64).astype(native)
    limb_count = 2 if dtype == "float64" else 1
    with pytest.raises(UpdateRejected) as info, np.errstate(over="ignore"):
        encode_limbs("w", limb_count, array, weight, 2)
    assert words in info.value.message
