"""Secure aggregation end to end: a real aggregator core, real collaborators, the
in-process transport (and its wire round trip), masks from real X25519 keys.

What the aggregator sees of one site's update must look uniformly random; what it
unmasks must be the plain weighted sum up to the fixed-point rounding; and a site that
drops out before its masked upload, or after it, must not stop the round.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import wait_until
from observed import Observed
from scipy import stats

from fedloom.core.errors import FaultInjected, QuorumError, UpdateRejected
from fedloom.core.records import CloseReason, FailureKind, Instruction, InstructionKind, SiteAnswer
from fedloom.core.weights import Weights
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.quantize import encode, fractional_bits
from fedloom.privacy.secagg import KEYS, REVEAL, UNMASK, dumps
from fedloom.privacy.settings import PrivacyPlan, SecureAggregationPlan
from fedloom.privacy.site import SitePrivacy
from fedloom.transport import InProcessTransport
from fedloom.transport.messages import ExchangeMessage

SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")
SAMPLES = {"site-a": 30, "site-b": 50, "site-c": 20, "site-d": 40, "site-e": 60}
SHAPE = (100, 200)  # 20,000 values: enough for a sharp test of uniformity


def model() -> Weights:
    return {"w": np.zeros(SHAPE, dtype=np.float32), "b": np.zeros(7, dtype=np.float64)}


def delta_of(site: str, round: int) -> Weights:
    rng = np.random.default_rng([SITES.index(site), round])
    return {
        "w": rng.normal(0, 0.2, SHAPE).astype(np.float32),
        "b": rng.uniform(-1, 1, 7),
    }


class Runner:
    """A site's local work: a fixed update per (site, round); optionally it fails."""

    def __init__(self, site: str, fail_in: int | None = None) -> None:
        self.site, self.fail_in = site, fail_in

    def __call__(self, instruction: Instruction, weights: Weights) -> SiteAnswer:
        if instruction.kind is InstructionKind.EVALUATE:
            return SiteAnswer(SAMPLES[self.site], {"loss": 1.0}, None)
        if instruction.round == self.fail_in:
            raise RuntimeError("the site's machine went down before it sent its update")
        return SiteAnswer(SAMPLES[self.site], {"loss": 1.0}, delta_of(self.site, instruction.round))


def run_federation(
    make_federation: Any,
    *,
    bits: int = 32,
    rounds: int = 1,
    fail: dict[str, int] | None = None,
    crash_before_unmask: dict[str, int] | None = None,
    min_fraction: float = 1.0,
    roundtrip: bool = False,
) -> tuple[Any, Observed, AggregatorPrivacy]:
    plan = PrivacyPlan(secure_aggregation=SecureAggregationPlan(bits=bits))
    privacy = AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100)
    observed: list[Observed] = []

    def transport(aggregator: Any) -> InProcessTransport:
        observed.append(Observed(aggregator))
        return InProcessTransport(observed[0], roundtrip=roundtrip)

    fed = make_federation(
        model(),
        transport=transport,
        privacy=privacy,
        roster=SITES,
        rounds=rounds,
        sites_per_round=len(SITES),
        min_fraction=min_fraction,
        max_samples=100,
    )
    for site in SITES:
        from fedloom.core.clock import FaultPoints

        faults = FaultPoints()
        if crash_before_unmask and site in crash_before_unmask:
            crash_round = crash_before_unmask[site]

            def crash(name: str, context: dict[str, Any], at: int = crash_round) -> None:
                if context["round"] == at:
                    raise FaultInjected("the site went down right after its masked upload")

            faults.arm("site.secagg.unmask", crash)
        fed.start_site(
            site,
            Runner(site, (fail or {}).get(site)),
            privacy=SitePrivacy(site, plan, per_round=len(SITES), max_samples=100),
            faults=faults,
        )
    fed.start()
    return fed, observed[0], privacy


def plain_mean(sites: list[str], round: int) -> Weights:
    total = sum(SAMPLES[s] for s in sites)
    return {
        name: sum(SAMPLES[s] * delta_of(s, round)[name].astype(np.float64) for s in sites) / total
        for name in ("w", "b")
    }


def assert_within(got: Weights, want: Weights, bound: float) -> None:
    """Every coordinate of ``got`` within ``bound`` of ``want``, plus the rounding of the
    model's own dtype (float32 "w", float64 "b") where that is coarser."""
    for name in ("w", "b"):
        value = np.asarray(got[name])
        error = np.max(np.abs(value.astype(np.float64) - want[name]))
        float_rounding = 4 * np.finfo(value.dtype).eps * max(1.0, float(np.max(np.abs(want[name]))))
        assert error <= bound + float_rounding, (name, error, bound)
    assert np.any(got["w"])


def quantisation_bound(sites: list[str], bits: int) -> float:
    """The bound of the fixed-point rounding on a coordinate of the mean: each site's
    rounding is at most 2**-(frac+1), over the total weight."""
    frac = fractional_bits(bits, len(SITES), 100, 1.0)
    return len(sites) * 2.0 ** -(frac + 1) / sum(SAMPLES[s] for s in sites)


@pytest.mark.parametrize("bits", [32, 64])
def test_a_masked_update_looks_uniform_and_the_unmasked_sum_is_the_plain_sum(
    make_federation: Any, bits: int
) -> None:
    fed, observed, _ = run_federation(make_federation, bits=bits, roundtrip=True)
    history = fed.finish()
    assert history[0].close_reason is CloseReason.ALL_ANSWERED

    # What the aggregator received from site-c, as the unsigned integers it is.
    dtype = np.uint32 if bits == 32 else np.uint64
    seen = np.frombuffer(b"".join(observed.uploads[("site-c", 1)]), dtype=dtype)
    assert seen.size == 20_000 + 7
    top = (seen >> np.array(bits - 8, dtype=dtype)).astype(np.int64)  # the high byte
    low = (seen & np.array(0xFF, dtype=dtype)).astype(np.int64)
    for byte in (top, low):
        counts = np.bincount(byte, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4  # uniform over 256 values
    assert stats.kstest(seen.astype(np.float64) / 2.0**bits, "uniform").pvalue > 1e-4

    # The same update encoded without masks is nothing like uniform: the test can fail.
    frac = fractional_bits(bits, len(SITES), 100, 1.0)
    clear = encode(
        delta_of("site-c", 1)["w"], weight=SAMPLES["site-c"], clip_range=1.0, frac=frac, bits=bits
    )
    clear_top = (clear >> np.array(bits - 8, dtype=dtype)).astype(np.int64)
    assert stats.chisquare(np.bincount(clear_top, minlength=256)).pvalue < 1e-12

    # The new model is the plain sample-weighted mean, up to the rounding bound.
    assert_within(
        fed.aggregator.weights, plain_mean(list(SITES), 1), quantisation_bound(list(SITES), bits)
    )


def test_a_site_dropping_after_the_key_exchange_before_its_masked_upload(
    make_federation: Any,
) -> None:
    fed, observed, _ = run_federation(make_federation, fail={"site-d": 1}, min_fraction=0.8)
    record = fed.finish()[0]
    assert record.close_reason is CloseReason.QUORUM
    assert [r.site for r in record.results] == ["site-a", "site-b", "site-c", "site-e"]
    [failure] = record.failures
    assert failure.site == "site-d" and failure.kind is FailureKind.ERROR
    assert ("site-d", 1) not in observed.uploads  # it never sent a masked update
    survivors = ["site-a", "site-b", "site-c", "site-e"]
    assert_within(
        fed.aggregator.weights, plain_mean(survivors, 1), quantisation_bound(survivors, 32)
    )


def test_a_site_dropping_after_its_masked_upload_before_unmasking(make_federation: Any) -> None:
    fed, observed, _ = run_federation(make_federation, crash_before_unmask={"site-b": 1})
    record = fed.finish()[0]
    assert record.close_reason is CloseReason.ALL_ANSWERED  # its masked update is in
    assert ("site-b", 1) in observed.uploads
    # site-b's update counts: its self-mask was rebuilt from the others' shares
    assert_within(
        fed.aggregator.weights, plain_mean(list(SITES), 1), quantisation_bound(list(SITES), 32)
    )


def test_too_many_dropouts_to_unmask_fail_the_attempt_and_reveal_nothing(
    make_federation: Any,
) -> None:
    """Three of five sites vanish after uploading: the two left cannot rebuild the
    masks (3 shares of 4 needed), so the attempt fails as no quorum, and the model
    stays as it was."""
    crash = {"site-a": 1, "site-b": 1, "site-c": 1}
    fed, _, _ = run_federation(make_federation, crash_before_unmask=crash)

    def unmasking_stalled() -> bool:
        current = fed.aggregator.snapshot()["current"]
        secagg = (current or {}).get("secure_aggregation") or {}
        return secagg.get("step") == "unmask" and secagg.get("revealed") == 2

    wait_until(unmasking_stalled, "the two sites left to reveal their shares")
    fed.clock.advance(61.0)  # past key_seconds: the aggregator stops waiting for shares
    with pytest.raises(QuorumError, match="could not unmask"):
        fed.finish()
    record = fed.aggregator.history[0]
    assert record.close_reason is CloseReason.NO_QUORUM
    assert all("could not unmask" in f.reason for f in record.failures)
    assert not np.any(fed.aggregator.weights["w"])


def test_secure_aggregation_refuses_a_strategy_that_needs_each_update() -> None:
    from fedloom.core.errors import PlanError
    from fedloom.plan import validate_plan

    with pytest.raises(PlanError, match="needs each site's update") as err:
        validate_plan(
            {"sites": 5, "strategy": {"name": "krum"}, "privacy": {"secure_aggregation": True}}
        )
    assert "choose a mean-based strategy" in str(err.value)


def test_fixed_point_bits_that_cannot_hold_the_sum_are_refused_with_the_fix() -> None:
    from fedloom.core.errors import PlanError
    from fedloom.plan import validate_plan

    with pytest.raises(PlanError, match="use bits: 64") as err:
        validate_plan({"sites": 50, "privacy": {"secure_aggregation": {"bits": 32}}})
    assert "training.max_samples" in str(err.value)
    plan = validate_plan(
        {"sites": 50, "training": {"max_samples": 1000}, "privacy": {"secure_aggregation": True}}
    )
    assert fractional_bits(32, 50, 1000, 1.0) >= 8 and plan.privacy.secure_aggregation


def test_masks_cancel_exactly_whatever_the_weights(make_federation: Any) -> None:
    """Two rounds over the wire round trip, 64-bit ring: each round's model is the
    plain mean within the rounding; nothing of the masks is left."""
    fed, _, _ = run_federation(make_federation, bits=64, rounds=2, roundtrip=True)
    history = fed.finish()
    assert [r.close_reason for r in history[:2]] == [CloseReason.ALL_ANSWERED] * 2
    want = {k: plain_mean(list(SITES), 1)[k] + plain_mean(list(SITES), 2)[k] for k in ("w", "b")}
    assert_within(fed.aggregator.weights, want, 2 * quantisation_bound(list(SITES), 64))


# ------------------------------------------------------- bad sites, bad messages


class NaNRunner(Runner):
    def __call__(self, instruction: Instruction, weights: Weights) -> SiteAnswer:
        answer = super().__call__(instruction, weights)
        if answer.delta is not None:
            answer.delta["b"][3] = np.nan
        return answer


def test_a_site_with_nan_in_its_update_fails_instead_of_hiding_it_in_the_sum(
    make_federation: Any,
) -> None:
    plan = PrivacyPlan(secure_aggregation=SecureAggregationPlan(bits=64))
    privacy = AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100)
    fed = make_federation(
        model(), privacy=privacy, roster=SITES, rounds=1, sites_per_round=len(SITES),
        min_fraction=0.8, max_samples=100,
    )  # fmt: skip
    for site in SITES:
        runner = NaNRunner(site) if site == "site-b" else Runner(site)
        fed.start_site(
            site, runner, privacy=SitePrivacy(site, plan, per_round=len(SITES), max_samples=100)
        )
    fed.start()
    record = fed.finish()[0]
    [failure] = record.failures
    assert failure.site == "site-b" and "NaN or infinite" in failure.reason
    survivors = ["site-a", "site-c", "site-d", "site-e"]
    assert_within(
        fed.aggregator.weights, plain_mean(survivors, 1), quantisation_bound(survivors, 64)
    )


class GarbageSite(SitePrivacy):
    """A broken (or hostile) site that sends random values instead of its masked update."""

    def protect(self, *args: Any, **kwargs: Any) -> Any:
        protected = super().protect(*args, **kwargs)
        rng = np.random.default_rng(7)
        for array in protected.tensors.values():
            array[...] = rng.integers(0, 2**32, size=array.shape, dtype=np.uint64).astype(
                array.dtype
            )
        return protected


def test_a_sum_the_sites_could_not_have_sent_is_refused_not_published(
    make_federation: Any,
) -> None:
    plan = PrivacyPlan(secure_aggregation=SecureAggregationPlan(bits=32))
    privacy = AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100)
    fed = make_federation(
        model(), privacy=privacy, roster=SITES, rounds=1, sites_per_round=len(SITES),
        max_samples=100,
    )  # fmt: skip
    for site in SITES:
        kind = GarbageSite if site == "site-e" else SitePrivacy
        fed.start_site(
            site, Runner(site), privacy=kind(site, plan, per_round=len(SITES), max_samples=100)
        )
    fed.start()
    with pytest.raises(QuorumError, match="out of range"):
        fed.finish()
    assert not np.any(fed.aggregator.weights["w"])  # nothing was published


def secagg_round(**kw: Any) -> Any:
    import threading

    from fedloom.core.clock import ManualClock
    from fedloom.core.weights import specs_of
    from fedloom.privacy.secagg_server import SecAggParameters, SecAggRound

    params = SecAggParameters(
        bits=32, frac=16, threshold=2 / 3, neighbours=None, key_seconds=60.0, clip_range=1.0
    )
    return SecAggRound(
        attempt_id="run/1.1",
        round=1,
        selected=SITES,
        specs=specs_of(model()),
        params=params,
        clock=ManualClock(),
        cond=threading.Condition(),
        in_round=lambda: SITES,
        drop=lambda site, reason: None,
        **kw,
    )


def test_malformed_or_stale_secure_aggregation_messages_are_refused_one_site_at_a_time() -> None:
    round_ = secagg_round()
    with pytest.raises(UpdateRejected, match="32 bytes, in hex"):
        round_.handle("site-a", KEYS, dumps({"attempt": "run/1.1", "c": "zz" * 32, "s": "00" * 32}))
    with pytest.raises(UpdateRejected, match="unusable public key"):  # a low-order point
        round_.handle("site-a", KEYS, dumps({"attempt": "run/1.1", "c": "00" * 32, "s": "00" * 32}))
    with pytest.raises(UpdateRejected, match="stale"):
        round_.handle("site-a", KEYS, dumps({"attempt": "run/1.0", "c": "00" * 32, "s": "00" * 32}))
    with pytest.raises(UpdateRejected, match="stale"):
        round_.handle("site-a", UNMASK, dumps({"attempt": "run/0.9"}))
    with pytest.raises(UpdateRejected, match="holds no shares"):
        round_.handle("site-a", UNMASK, dumps({"attempt": "run/1.1"}))  # never waits
    with pytest.raises(UpdateRejected, match="no unmasking under way"):
        round_.handle("site-a", REVEAL, dumps({"attempt": "run/1.1", "b": {}, "s": {}}))
    assert round_.describe()["keys"] == 0  # nothing of the refused messages was kept


@pytest.mark.parametrize("name", ["fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_every_mean_based_strategy_runs_on_the_unmasked_sum(
    make_federation: Any, name: str
) -> None:
    """Two rounds of each mean-based strategy with secure aggregation end where the same
    strategy ends without it, up to the fixed-point rounding carried through its
    steps."""
    from fedloom.strategies import STRATEGIES

    ends = []
    for private in (False, True):
        plan = PrivacyPlan(secure_aggregation=SecureAggregationPlan(bits=64) if private else None)
        privacy = (
            AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100) if private else None
        )
        fed = make_federation(
            model(), strategy=STRATEGIES[name](), privacy=privacy, roster=SITES, rounds=2,
            sites_per_round=len(SITES), max_samples=100, final_evaluation=False,
        )  # fmt: skip
        for site in SITES:
            site_privacy = SitePrivacy(site, plan, per_round=len(SITES), max_samples=100)
            fed.start_site(site, Runner(site), privacy=site_privacy if private else None)
        fed.start()
        assert [r.close_reason for r in fed.finish()] == [CloseReason.ALL_ANSWERED] * 2
        ends.append(fed.aggregator.weights)
    plain, masked = ends
    for key in ("w", "b"):
        assert np.allclose(masked[key], plain[key], rtol=1e-5, atol=1e-6), key
    assert np.any(plain["w"])


def test_a_step_of_secure_aggregation_outside_its_attempt_is_refused_by_name(
    make_federation: Any,
) -> None:
    """The steps are registered by the attempt's secure aggregation round: once the
    federation is over no attempt takes them, and a step nobody registered is unknown."""
    fed, _, _ = run_federation(make_federation)
    fed.finish()
    service = fed.aggregator
    with pytest.raises(UpdateRejected, match="no attempt takes step 'secagg.keys' for round 1"):
        service.exchange("site-a", ExchangeMessage(1, KEYS, dumps({"attempt": "run/1.1"})))
    with pytest.raises(UpdateRejected, match="no step 'secagg.other' in this federation"):
        service.exchange("site-a", ExchangeMessage(1, "secagg.other", b"{}"))
