"""The mean of bfloat16 and float16 updates, summed from the spools when the round
closes: the same integers as the eager fixed-point sum (checked against a naive
reference in Python integers), whatever the arrival order, the chunking and the block
size, with no int64 per value kept while the updates stream in."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.accumulate import MeanAccumulator
from fedloom.accumulate import deferred as deferred_module
from fedloom.core.weights import LazyWeights, TensorSpec, Weights, apply_delta

BF16 = np.dtype(ml_dtypes.bfloat16)
SPECS = (
    TensorSpec("a", "bfloat16", (7, 3)),
    TensorSpec("b", "float16", (11,)),
    TensorSpec("c", "float32", (4,)),  # summed eagerly, as before
)


def update(rng: np.random.Generator, scale: float) -> Weights:
    return {
        "a": (rng.normal(size=(7, 3)) * scale).astype(BF16),
        "b": (rng.normal(size=11) * scale).astype(np.float16),
        "c": (rng.normal(size=4) * scale).astype(np.float32),
    }


def naive_mean(updates: list[tuple[int, Weights]], name: str) -> np.ndarray:
    """The documented mean, in Python integers: float32 of sum(rint(w * x * 2**32)) /
    2**32 / W, each product exact in float64 (a narrow float times a weight < 2**29)."""
    total_weight = float(sum(w for w, _ in updates))
    flat = [(w, u[name].astype(np.float64).reshape(-1)) for w, u in updates]
    size = flat[0][1].size
    out = []
    for i in range(size):
        exact = sum(round(float(w) * float(x[i]) * 2.0**32) for w, x in flat)
        out.append(float(np.float64(exact) / 2.0**32 / total_weight))
    return np.array(out, dtype=np.float64).astype(np.float32).reshape(updates[0][1][name].shape)


def stream(acc: MeanAccumulator, site: str, weight: int, u: Weights, chunk: int) -> None:
    contribution = acc.begin(site, weight)
    for index, spec in enumerate(SPECS):
        raw = np.ascontiguousarray(u[spec.name]).reshape(-1).view(np.uint8).tobytes()
        step = chunk * np.dtype(u[spec.name].dtype).itemsize
        for start in range(0, len(raw), step):
            contribution.add(index, start, raw[start : start + step])
    contribution.finish()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sites=st.integers(1, 5),
    chunk=st.integers(1, 9),
    block=st.integers(1, 12),
    scale=st.sampled_from([1e-6, 1e-2, 1.0, 50.0]),
)
def test_the_deferred_mean_is_the_exact_fixed_point_mean_in_any_order_and_chunking(
    seed: int, sites: int, chunk: int, block: int, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    updates = [(int(rng.integers(1, 1000)), update(rng, scale)) for _ in range(sites)]
    order = rng.permutation(sites)
    acc = MeanAccumulator(SPECS, max_sites=8)
    for i in order:  # any arrival order, any chunk size
        stream(acc, f"site-{i}", *updates[i], chunk=chunk)
    old_block = deferred_module.BLOCK
    deferred_module.BLOCK = block  # any block size: the same bits
    try:
        mean = acc.summary(1, ()).mean_delta
        assert isinstance(mean, LazyWeights)
        for name in ("a", "b"):
            got = mean[name]
            assert got.dtype == np.float32 and got.shape == updates[0][1][name].shape
            assert got.tobytes() == naive_mean(updates, name).tobytes()
            assert mean[name].tobytes() == got.tobytes()  # read again: the same bits
        # the model moves block by block from the lazy mean to the same bits as from
        # the whole mean
        base = update(rng, 1.0)
        assert all(
            a.tobytes() == b.tobytes()
            for a, b in zip(
                apply_delta(base, mean).values(),
                apply_delta(base, dict(mean)).values(),
                strict=True,
            )
        )
    finally:
        deferred_module.BLOCK = old_block
    in_order = MeanAccumulator(SPECS, max_sites=8)
    for i in range(sites):
        in_order.fold(f"site-{i}", *updates[i])
    again = in_order.summary(1, ()).mean_delta
    assert all(again[n].tobytes() == mean[n].tobytes() for n in ("a", "b", "c"))


def test_an_aborted_narrow_update_leaves_no_trace_and_a_refused_one_says_why() -> None:
    rng = np.random.default_rng(0)
    first, second = update(rng, 1.0), update(rng, 1.0)
    acc = MeanAccumulator(SPECS, max_sites=4)
    acc.fold("a", 3, first)
    broken = acc.begin("b", 5)
    raw = first["a"].reshape(-1).view(np.uint8).tobytes()
    broken.add(0, 0, raw[:10])
    broken.abort("the stream broke off")
    nan = {**second, "b": np.full(11, np.nan, dtype=np.float16)}
    with pytest.raises(Exception, match="NaN"):
        acc.fold("c", 5, nan)
    alone = MeanAccumulator(SPECS, max_sites=4)
    alone.fold("a", 3, first)
    got, want = acc.summary(1, ()).mean_delta, alone.summary(1, ()).mean_delta
    assert all(got[n].tobytes() == want[n].tobytes() for n in ("a", "b", "c"))


def test_a_large_tensor_moves_in_blocks_to_the_same_bits() -> None:
    rng = np.random.default_rng(1)
    size = (1 << 22) + 17  # more than one block of apply_delta
    base = {"w": rng.normal(size=size).astype(BF16)}
    delta = {"w": (rng.normal(size=size) * 1e-3).astype(np.float32)}
    moved = apply_delta(base, delta)["w"]
    whole = (base["w"].astype(np.float64) + delta["w"]).astype(BF16)
    assert moved.dtype == BF16 and moved.tobytes() == whole.tobytes()
