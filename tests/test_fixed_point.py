"""Secure aggregation's fixed-point encoding, checked from outside against exact rational
arithmetic (``fractions.Fraction``) at both widths of the ring.

- Each site's integer is the one nearest the exact product ``clip(x) * weight * 2**frac``
  (ties to even), so it is off by at most half a unit, at 32 bits and at 64.
- The range check after unmasking refuses no honest sum, whatever the clip range, the
  weights and the number of sites, and still refuses a sum with one garbage site.
- The decoded mean is within the bound docs/privacy.md states.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedloom.accumulate.masked import MaskedSumAccumulator
from fedloom.core.records import CloseReason, Instruction, InstructionKind, SiteAnswer
from fedloom.core.weights import TensorSpec, Weights
from fedloom.privacy import masking
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.quantize import (
    decode,
    encode,
    fractional_bits,
    honest_limit,
    mean_error_bound,
    range_problem,
    sum_problem,
    unsigned,
)
from fedloom.privacy.settings import PrivacyPlan, SecureAggregationPlan
from fedloom.privacy.site import SitePrivacy

BITS = (32, 64)


def signed(values: np.ndarray, bits: int) -> list[int]:
    return [int(v) for v in np.asarray(values).view(np.int32 if bits == 32 else np.int64)]


def exact(x: float, weight: int, clip_range: float, frac: int) -> Fraction:
    """``clip(x) * weight * 2**frac``, exactly."""
    clipped = min(max(float(x), -clip_range), clip_range)  # exact: picks one of the three
    return Fraction(clipped) * (weight << frac)


# ---------------------------------------------------------------- one site


DTYPES = (np.float64, np.float32, np.float16)


@settings(max_examples=1000, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    dtype=st.sampled_from(DTYPES),
    sites=st.integers(1, 50),
    max_weight=st.one_of(st.integers(1, 10**6), st.integers(2**29 - 2, 2**31)),
    clip_range=st.floats(1e-4, 1e4),
    data=st.data(),
)
@example(  # the float64 product of the old encoding was off by 128 units here
    bits=64, dtype=np.float64, sites=2, max_weight=100, clip_range=2.469162753625644, data=None
).via("an error of 128 units before the encoding was exact")
def test_each_site_is_encoded_to_the_nearest_integer_exactly(
    bits: int, dtype: Any, sites: int, max_weight: int, clip_range: float, data: Any
) -> None:
    """``round(clip(x) * weight * 2**frac)`` of the exact product: off by at most half a
    unit of ``2**-frac``, ties to even, at both widths, for float64, float32 and float16
    updates (the last two take a shorter path when the weight is small enough)."""
    if range_problem(bits, sites, max_weight, clip_range) is not None:
        return  # a plan the validation refuses
    frac = fractional_bits(bits, sites, max_weight, clip_range)
    if data is None:
        weight, xs = 96, np.array([-1.5982571784389301])
    else:
        weight = data.draw(st.integers(1, max_weight), label="weight")
        scale = Fraction(weight * 2**frac)
        ties = st.integers(-(2**40), 2**40).map(lambda k: float(Fraction(2 * k + 1, 2) / scale))
        near = st.one_of(
            st.floats(allow_nan=False, allow_infinity=False),
            st.floats(-clip_range, clip_range),
            st.sampled_from([clip_range, -clip_range, 0.0, -0.0]),
            ties,  # half-way cases, as near as float64 gets to them
        )
        drawn = data.draw(st.lists(near, min_size=1, max_size=16), label="values")
        largest = float(np.finfo(dtype).max)
        xs = np.clip(np.array(drawn), -largest, largest).astype(dtype)
    got = signed(encode(xs, weight=weight, clip_range=clip_range, frac=frac, bits=bits), bits)
    for x, n in zip(xs, got, strict=True):
        want = exact(float(x), weight, clip_range, frac)
        assert n == round(want), (x, weight, frac, n, want)  # round(): ties to even
        assert abs(n - want) <= Fraction(1, 2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_narrow_and_float64_tensors_and_large_ones_encode_alike(bits: int, dtype: Any) -> None:
    """Blocks of a large tensor are encoded as the whole would be; a float32 or float16
    tensor (the shorter path) as its float64 values, clipped coordinates included."""
    rng = np.random.default_rng(5)
    values = rng.normal(0, 0.4, 100_003).astype(dtype)
    assert np.mean(np.abs(values) >= 0.7) > 0.05  # many clipped coordinates
    frac = fractional_bits(bits, 10, 1000, 0.7)
    whole = encode(values, weight=777, clip_range=0.7, frac=frac, bits=bits)
    assert whole.dtype == unsigned(bits) and whole.shape == (values.size,)
    wide = encode(values.astype(np.float64), weight=777, clip_range=0.7, frac=frac, bits=bits)
    assert np.array_equal(whole, wide)
    for i in rng.integers(0, values.size, 200):
        want = round(exact(float(values[i]), 777, 0.7, frac))
        assert signed(whole[i : i + 1], bits) == [want]


# ----------------------------------------------- the masked sum and its range check


class MaskedRound:
    """Each site's update encoded and masked as a site sends it: plus a self mask, plus
    the mask it shares with the next site on a ring of the sites, minus the one it
    shares with the previous (ChaCha20 streams, so every pairwise mask cancels);
    :meth:`unmasked_sum` folds them in the aggregator's accumulator and removes the
    self masks."""

    def __init__(
        self,
        updates: list[np.ndarray],
        weights: list[int],
        *,
        clip_range: float,
        frac: int,
        bits: int,
        seed: int,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.bits, self.size, self.weights = bits, updates[0].size, weights
        self.names = [f"site-{i:02d}" for i in range(len(updates))]
        self.own = [masking.mask_slice(rng.bytes(32), 0, self.size, bits) for _ in updates]
        ring = [masking.mask_slice(rng.bytes(32), 0, self.size, bits) for _ in updates]
        self.sent = [
            encode(u, weight=w, clip_range=clip_range, frac=frac, bits=bits)
            + self.own[i]
            + ring[i]
            - ring[i - 1]
            for i, (u, w) in enumerate(zip(updates, weights, strict=True))
        ]

    def unmasked_sum(self, garbage: int | None = None, seed: int = 0) -> list[np.ndarray]:
        """The unmasked sum modulo ``2**bits``; site ``garbage``, if any, sends uniformly
        random integers instead of its masked update (as do masks that do not cancel)."""
        dtype = unsigned(self.bits)
        accumulator = MaskedSumAccumulator(
            (TensorSpec("w", dtype.name, (self.size,)),), admit=lambda site: None
        )
        for i, (name, sent, weight) in enumerate(
            zip(self.names, self.sent, self.weights, strict=True)
        ):
            if i == garbage:
                rng = np.random.default_rng(seed)
                sent = rng.integers(0, 2**self.bits, self.size, dtype=np.uint64).astype(dtype)
            contribution = accumulator.begin(name, weight)
            contribution.add(0, 0, sent.tobytes())
            contribution.finish()
        [total] = accumulator.sums()
        for own in self.own:
            total -= own
        return [total]


@st.composite
def rounds(draw: Any, bits: int) -> dict[str, Any]:
    """A round of honest sites: a clip range (rarely a power of two), sample-count
    weights up to the plan's cap, float64 or float32 updates with coordinates inside,
    at and beyond the clip range, and one coordinate all sites push past it."""
    sites = draw(st.integers(2, 12), label="sites")
    max_weight = draw(st.sampled_from([1, 5, 100, 1000, 100_000]), label="max_samples")
    clip_range = draw(st.floats(1e-3, 1e3), label="clip_range")
    if range_problem(bits, sites, max_weight, clip_range) is not None:
        clip_range = draw(st.floats(1e-3, 1.0), label="clip_range (smaller)")
        max_weight = 5
    weights = draw(st.lists(st.integers(1, max_weight), min_size=sites, max_size=sites))
    seed = draw(st.integers(0, 2**32), label="seed")
    # the coordinates come from the seed (hypothesis draws the shape of the round):
    # inside the clip range, exactly at either end, or beyond it
    rng = np.random.default_rng(seed)
    size = (sites, 32)
    kind = rng.integers(0, 3, size)
    edge = rng.choice([-clip_range, clip_range], size)
    updates = np.where(kind == 0, rng.uniform(-clip_range, clip_range, size), edge)
    updates = np.where(kind == 2, rng.uniform(-4 * clip_range, 4 * clip_range, size), updates)
    shared = draw(st.sampled_from([clip_range, -clip_range, 2 * clip_range]))
    updates[:, 0] = shared  # every site clipped at the same coordinate
    dtype = draw(st.sampled_from([np.float64, np.float32]), label="dtype")
    return {
        "updates": list(updates.astype(dtype)),
        "weights": weights,
        "clip_range": clip_range,
        "frac": fractional_bits(bits, sites, max_weight, clip_range),
        "seed": seed,
    }


@pytest.mark.parametrize("bits", BITS)
@settings(max_examples=1500, deadline=None)
@given(data=st.data())
def test_no_honest_sum_is_refused_and_a_garbage_site_is(bits: int, data: Any) -> None:
    """Thousands of random honest rounds (1,500 per width): the exact range check
    refuses none, and the unmasked mean is within the documented bound; the same round
    with one site sending garbage is refused."""
    r = data.draw(rounds(bits))
    common = {"clip_range": r["clip_range"], "frac": r["frac"], "bits": bits}
    masked = MaskedRound(r["updates"], r["weights"], seed=r["seed"], **common)
    sums = masked.unmasked_sum()
    assert sum_problem(sums, r["weights"], **common) is None
    check_mean(sums, r["updates"], r["weights"], **common)

    garbage = data.draw(st.integers(0, len(r["updates"]) - 1), label="garbage site")
    bad = masked.unmasked_sum(garbage=garbage, seed=r["seed"])
    problem = sum_problem(bad, r["weights"], **common)
    # each of the 32 coordinates in range with probability at most about 1/2
    assert problem is not None and "out of range" in problem


def check_mean(
    sums: list[np.ndarray],
    updates: list[np.ndarray],
    weights: list[int],
    *,
    clip_range: float,
    frac: int,
    bits: int,
) -> None:
    """The integer sum within ``sites / 2`` units of the exact weighted sum, and the mean
    as the aggregator computes it (decode, divide by the total weight) within
    :func:`mean_error_bound`, both checked in exact rational arithmetic."""
    [total] = sums
    total_weight = sum(weights)
    mean = decode(total, frac=frac, bits=bits) / float(total_weight)
    for i, n in enumerate(signed(total, bits)):
        want = sum(exact(u[i], w, clip_range, frac) for u, w in zip(updates, weights, strict=True))
        assert abs(n - want) <= Fraction(len(updates), 2)
        true_mean = want / 2**frac / total_weight
        bound = mean_error_bound(len(updates), total_weight, frac, float(mean[i]))
        assert abs(Fraction(float(mean[i])) - true_mean) <= Fraction(bound)


@pytest.mark.parametrize("bits", BITS)
def test_the_honest_limit_is_tight(bits: int) -> None:
    """Every site at +clip_range reaches the limit exactly and passes; one more unit on
    one coordinate is refused."""
    weights, clip_range = [1, 5, 3], 0.3
    frac = fractional_bits(bits, 3, 5, clip_range)
    limit = honest_limit(weights, clip_range=clip_range, frac=frac)
    updates = [np.full(4, clip_range) for _ in weights]
    total = sum(
        (
            encode(u, weight=w, clip_range=clip_range, frac=frac, bits=bits)
            for u, w in zip(updates, weights, strict=True)
        ),
        start=np.zeros(4, dtype=unsigned(bits)),
    )
    assert signed(total, bits) == [limit] * 4
    common = {"clip_range": clip_range, "frac": frac, "bits": bits}
    assert sum_problem([total], weights, **common) is None
    assert sum_problem([-total], weights, **common) is None
    total[2] += np.array(1, dtype=unsigned(bits))
    assert "out of range" in (sum_problem([total], weights, **common) or "")


# ------------------------------------------------- the case, end to end


class FixedRunner:
    """A site with a fixed sample count and update."""

    def __init__(self, samples: int, delta: np.ndarray) -> None:
        self.samples, self.delta = samples, delta

    def __call__(self, instruction: Instruction, weights: Weights) -> SiteAnswer:
        if instruction.kind is InstructionKind.EVALUATE:
            return SiteAnswer(self.samples, {"loss": 1.0}, None)
        return SiteAnswer(self.samples, {"loss": 1.0}, {"w": self.delta.copy()})


@pytest.mark.parametrize("bits", BITS)
def test_two_sites_clipped_at_the_same_coordinate_unmask_to_the_right_mean(
    make_federation: Any, bits: int
) -> None:
    """Issue 13: two honest sites, clip_range 0.3, weights 1 and 5, one coordinate at 0.5
    at both. At 64 bits the unmasked sum was refused as "out of range (1.8 > 1.8)"."""
    clip_range = 0.3
    plan = PrivacyPlan(secure_aggregation=SecureAggregationPlan(bits=bits, clip_range=clip_range))
    sites = ("site-a", "site-b")
    samples = {"site-a": 1, "site-b": 5}
    deltas = {
        "site-a": np.array([0.5, 0.1, -0.7, 1e-9]),
        "site-b": np.array([0.5, -0.2, 0.25, 0.3]),
    }
    privacy = AggregatorPrivacy(plan, per_round=2, max_samples=100)
    fed = make_federation(
        {"w": np.zeros(4)}, privacy=privacy, roster=sites, rounds=1, sites_per_round=2,
        max_samples=100,
    )  # fmt: skip
    for site in sites:
        fed.start_site(
            site,
            FixedRunner(samples[site], deltas[site]),
            privacy=SitePrivacy(site, plan, per_round=2, max_samples=100),
        )
    fed.start()
    record = fed.finish()[0]
    assert record.close_reason is CloseReason.ALL_ANSWERED and not record.failures
    got = fed.aggregator.weights["w"]
    frac = fractional_bits(bits, 2, 100, clip_range)
    for i, value in enumerate(got):
        want = sum(exact(deltas[s][i], samples[s], clip_range, 0) for s in sites) / 6
        bound = mean_error_bound(2, 6, frac, float(value))
        assert abs(Fraction(float(value)) - want) <= Fraction(bound), (i, value, want)
    assert abs(got[0] - 0.3) <= mean_error_bound(2, 6, frac, 0.3)  # both clipped to 0.3
