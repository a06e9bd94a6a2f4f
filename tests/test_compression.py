"""Compression: the codecs' maths, error feedback, the aggregator's streaming decode and
its refusals, the plan's rules, and real federations (simulated digits, gRPC with mutual
TLS) with compressed updates and models."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from conftest import Worker, federation_config
from cryptography import x509
from grpcnet import GrpcTestTransport
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from workspaces import make_workspace, run_cli

from fedloom import PlanError, SimulationOptions, load_plan, simulate
from fedloom.aggregator import Aggregator
from fedloom.collaborator import Collaborator
from fedloom.compression import (
    Codec,
    Compression,
    ErrorFeedback,
    ModelCodec,
    SiteCompression,
    check_encoded,
    decode,
    decode_model,
    encode,
    encode_model,
)
from fedloom.compression.codecs import INT8_BLOCK, int8_steps, topk_count
from fedloom.core.errors import FedloomError, ModelRejected, TaskError, UpdateRejected
from fedloom.core.records import CloseReason, FailureKind, Instruction, InstructionKind, SiteAnswer
from fedloom.core.weights import TensorSpec, Weights, dtype_from_name, specs_of, weights_equal
from fedloom.pki import server_credentials
from fedloom.plan import validate_plan
from fedloom.privacy.audit import AuditLog
from fedloom.privacy.audit_records import read_records
from fedloom.privacy.published import model_checker, signer_from_pem
from fedloom.strategies import FedAvg
from fedloom.transport import UpdateHeader, iter_chunks

pytestmark = pytest.mark.server

PROPERTY = settings(max_examples=60, deadline=None)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

finite32 = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)
float32_arrays = hnp.arrays(np.float32, shapes, elements=finite32)


@st.composite
def updates(draw: st.DrawFn) -> Weights:
    """A model-like update: float32, float64, float16, bfloat16 and int64 tensors."""
    out: Weights = {"w": draw(float32_arrays)}
    out["b"] = draw(hnp.arrays(np.float64, shapes, elements=st.floats(-1e3, 1e3)))
    out["h"] = draw(hnp.arrays(np.float16, shapes, elements=st.floats(-100, 100, width=16)))
    out["z"] = draw(hnp.arrays(np.float32, shapes, elements=finite32)).astype(BFLOAT16)
    out["steps"] = draw(hnp.arrays(np.int64, shapes, elements=st.integers(-(2**40), 2**40)))
    return out


def codec(update: Codec, **kwargs: Any) -> Compression:
    return Compression(update=update, **kwargs)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def as64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


# ---------------------------------------------------------------- the codecs


@PROPERTY
@given(update=updates(), which=st.sampled_from(list(Codec)), fraction=st.floats(0.001, 1.0))
def test_every_codec_decodes_to_the_models_specs(
    update: Weights, which: Codec, fraction: float
) -> None:
    compression = codec(which, topk_fraction=fraction)
    specs = specs_of(update)
    encoded = encode(update, compression, rng=rng())
    check_encoded(specs_of(encoded), specs, compression)  # what travels is its encoding
    decoded = decode(encoded, specs, compression)
    assert specs_of(decoded) == specs
    assert np.array_equal(decoded["steps"], update["steps"])  # integers travel exactly
    if not which.lossy:
        assert weights_equal(decoded, update)


@PROPERTY
@given(update=updates())
def test_zstd_is_exact_for_every_dtype(update: Weights) -> None:
    compression = codec(Codec.ZSTD)
    encoded = encode(update, compression, rng=rng())
    assert all(a.dtype == np.uint8 and a.ndim == 1 for a in encoded.values())
    assert weights_equal(decode(encoded, specs_of(update), compression), update)


def test_zstd_shrinks_what_repeats() -> None:
    update = {"w": np.zeros((256, 256), np.float32), "b": np.full(1000, 0.5, np.float64)}
    encoded = encode(update, codec(Codec.ZSTD), rng=rng())
    assert sum(a.nbytes for a in encoded.values()) < 1000


@PROPERTY
@given(values=float32_arrays)
def test_float16_and_bfloat16_are_off_by_at_most_half_a_unit_in_the_last_place(
    values: np.ndarray,
) -> None:
    x = as64(values)
    for which, relative, tiny in (
        (Codec.FLOAT16, 2.0**-11, 2.0**-25),
        (Codec.BFLOAT16, 2.0**-8, 2.0**-134),
    ):
        encoded = encode({"w": values}, codec(which), rng=rng())
        assert encoded["w"].dtype == dtype_from_name(which.value)  # half the bytes
        decoded = decode(encoded, specs_of({"w": values}), codec(which))["w"]
        assert decoded.dtype == np.float32
        error = np.abs(as64(decoded) - x)
        assert np.all(error <= np.abs(x) * relative + tiny + 1e-45)


def test_float16_refuses_values_beyond_its_range_and_nan_is_never_sent() -> None:
    with pytest.raises(TaskError, match="beyond float16's range"):
        encode({"w": np.array([1e5], np.float32)}, codec(Codec.FLOAT16), rng=rng())
    for which in (Codec.INT8, Codec.TOPK, Codec.BFLOAT16):
        with pytest.raises(TaskError, match="NaN or infinite"):
            encode({"w": np.array([1.0, np.nan], np.float32)}, codec(which), rng=rng())


@PROPERTY
@given(values=float32_arrays, seed=st.integers(0, 2**32))
def test_int8_is_off_by_less_than_one_step(values: np.ndarray, seed: int) -> None:
    spec = specs_of({"w": values})
    encoded = encode({"w": values}, codec(Codec.INT8), rng=rng(seed))
    assert encoded["w"].dtype == np.int8 and encoded["w"].shape == values.shape
    assert encoded["w@scale"].dtype == np.float32
    assert encoded["w@scale"].shape == (-(-values.size // INT8_BLOCK),)
    assert encoded["w"].size == 0 or int(encoded["w"].min()) >= -127
    decoded = decode(encoded, spec, codec(Codec.INT8))["w"]
    step = np.repeat(as64(encoded["w@scale"]), INT8_BLOCK)[: values.size].reshape(values.shape)
    error = np.abs(as64(decoded) - as64(values))
    assert np.all(error < step + np.abs(as64(values)) * 2.0**-23 + 1e-45)


def test_int8_steps_never_leave_a_value_beyond_127_steps() -> None:
    awkward = np.array([1.0, 3.0, 1e-3, 7.0, 1e-38, 1e-44, 0.0, 12345.678])
    for peak in awkward:
        step = int8_steps(np.array([peak, -peak / 3]))
        assert step.dtype == np.float32
        assert peak / float(step[0]) <= 127 if peak else step[0] == 0


def test_int8_stochastic_rounding_is_unbiased() -> None:
    # values a fraction 0.3 or 0.7 of a step between two codes: rounding to the nearest
    # code is off by 0.3 steps on every one of them, in the same direction every time
    step = np.float32(1 / 64)
    codes = np.arange(-60, 60, dtype=np.float64)
    x = np.concatenate([(codes + 0.3) * step, (codes - 0.7) * step, [127 * step]])
    values = x.astype(np.float32)
    spec = specs_of({"w": values})
    draws = 3000
    total = np.zeros(values.size)
    for seed in range(draws):
        encoded = encode({"w": values}, codec(Codec.INT8), rng=rng(seed))
        assert encoded["w@scale"][0] == step
        total += decode(encoded, spec, codec(Codec.INT8))["w"]
    bias = np.abs(total / draws - as64(values)) / float(step)
    # one draw's spread is at most half a step, so the mean of 3,000 is within 0.05 steps
    # (5 deviations); nearest rounding would be off by 0.3
    assert bias.max() < 0.05
    nearest = np.rint(as64(values) / float(step)) * float(step)
    assert (np.abs(nearest - as64(values)) / float(step)).max() > 0.25


@PROPERTY
@given(values=float32_arrays, fraction=st.floats(0.001, 1.0))
def test_topk_keeps_exactly_the_k_largest_magnitudes(values: np.ndarray, fraction: float) -> None:
    compression = codec(Codec.TOPK, topk_fraction=fraction)
    encoded = encode({"w": values}, compression, rng=rng())
    k = topk_count(values.size, fraction)
    idx, val = encoded["w@idx"], encoded["w@val"]
    assert idx.dtype == np.uint32 and idx.shape == (k,) and val.shape == (k,)
    assert np.all(np.diff(idx.astype(np.int64)) > 0)
    flat = values.reshape(-1)
    assert np.array_equal(val, flat[idx])  # the values themselves, exactly
    dropped = np.delete(np.abs(flat), idx.astype(np.int64))
    if k and dropped.size:
        assert np.abs(val).min() >= dropped.max()
    decoded = decode(encoded, specs_of({"w": values}), compression)["w"].reshape(-1)
    assert np.array_equal(decoded[idx], val)
    assert np.count_nonzero(np.delete(decoded, idx.astype(np.int64))) == 0


def test_topk_count_is_the_ceiling_and_at_least_one() -> None:
    assert topk_count(1000, 0.01) == 10
    assert topk_count(1001, 0.01) == 11
    assert topk_count(5, 0.01) == 1
    assert topk_count(0, 0.5) == 0
    assert topk_count(7, 1.0) == 7


# ------------------------------------------------------------- error feedback


@PROPERTY
@given(
    rounds=st.lists(hnp.arrays(np.float32, (6, 7), elements=finite32), min_size=1, max_size=6),
    fraction=st.floats(0.01, 0.5),
)
def test_error_feedback_sends_in_the_end_all_that_was_held_back(
    rounds: list[np.ndarray], fraction: float
) -> None:
    site = SiteCompression(codec(Codec.TOPK, topk_fraction=fraction), seed=0)
    spec = (TensorSpec("w", "float32", (6, 7)),)
    sent = np.zeros((6, 7))
    for number, update in enumerate(rounds, 1):
        encoded, params = site.encode("site-a", number, {"w": update})
        assert params == {"codec": "topk", "fraction": fraction, "error_feedback": True}
        sent += decode(encoded, spec, site.settings)["w"]  # what the aggregator sees
        site.settle("site-a", number, accepted=True)
    residual = site.feedback.residual("site-a")["w"]
    expected = np.sum([as64(u) for u in rounds], axis=0)
    np.testing.assert_allclose(sent + residual, expected, rtol=1e-12, atol=1e-9)


def test_a_refused_update_leaves_the_residual_as_it_was_and_sites_keep_their_own() -> None:
    feedback = ErrorFeedback()
    site = SiteCompression(codec(Codec.TOPK, topk_fraction=0.25), seed=0, feedback=feedback)
    update = {"w": np.array([4.0, 3.0, 2.0, 1.0], np.float32)}
    site.encode("site-a", 1, update)
    site.settle("site-a", 1, accepted=True)
    assert np.array_equal(feedback.residual("site-a")["w"], [0.0, 3.0, 2.0, 1.0])
    site.encode("site-a", 2, update)
    site.settle("site-a", 2, accepted=False)  # refused: nothing of round 2 counts
    assert np.array_equal(feedback.residual("site-a")["w"], [0.0, 3.0, 2.0, 1.0])
    assert feedback.residual("site-b") == {}
    encoded, _ = site.encode("site-a", 3, update)  # the residual comes along: 6 > 4
    assert encoded["w@idx"].tolist() == [1] and encoded["w@val"].tolist() == [6.0]


# ----------------------------------------------------- refusals of bad input


def bad(encoded: Weights, spec: TensorSpec, compression: Compression, reason: str) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        decode(encoded, (spec,), compression)


def test_malformed_encodings_are_refused_with_the_reason() -> None:
    spec = TensorSpec("w", "float32", (4,))
    good_int8 = {"w": np.array([1, -2, 3, 127], np.int8), "w@scale": np.array([0.5], np.float32)}
    bad(
        {**good_int8, "w@scale": np.array([np.nan], np.float32)},
        spec,
        codec(Codec.INT8),
        "scale holds NaN",
    )
    bad(
        {**good_int8, "w": np.array([-128, 0, 0, 0], np.int8)},
        spec,
        codec(Codec.INT8),
        "-128 is outside",
    )
    bad(
        {"w": np.ones(4, np.float32)},
        spec,
        codec(Codec.INT8),
        "has 1 tensors; the int8 encoding of the global model's 1 tensors has 2",
    )
    bad(
        {"w": np.ones(3, np.int8), "w@scale": np.ones(1, np.float32)},
        spec,
        codec(Codec.INT8),
        r"'w' int8\[3\] is not part of the int8 encoding of the global model's 'w' float32\[4\]",
    )
    topk = codec(Codec.TOPK, topk_fraction=0.5)
    values = np.array([1.0, 2.0], np.float32)
    bad(
        {"w@idx": np.array([1, 4], np.uint32), "w@val": values},
        spec,
        topk,
        "index 4 is out of range for 4 values",
    )
    bad(
        {"w@idx": np.array([2, 2], np.uint32), "w@val": values},
        spec,
        topk,
        "repeat or are not ascending",
    )
    bad(
        {"w@idx": np.array([0, 1, 2], np.uint32), "w@val": np.ones(3, np.float32)},
        spec,
        topk,
        "expected 'w@idx' uint32",
    )
    zstd = codec(Codec.ZSTD)
    frame = encode({"w": np.arange(4, dtype=np.float32)}, zstd, rng=rng())["w@zstd"]
    bad({"w@zstd": np.frombuffer(b"not zstd", np.uint8)}, spec, zstd, "is not a zstd frame")
    bad({"w@zstd": frame[:-3]}, spec, zstd, "does not decompress|cut short")
    bad({"w@zstd": np.concatenate([frame, frame])}, spec, zstd, "followed by other bytes")
    other = encode({"w": np.arange(5, dtype=np.float32)}, zstd, rng=rng())["w@zstd"]
    bad({"w@zstd": other}, spec, zstd, "holds 20 bytes, the tensor 16")


def test_tensor_names_holding_the_separator_are_refused_at_both_ends(tiny_weights: Weights) -> None:
    clash = {"w@scale": np.ones(3, np.float32)}
    with pytest.raises(TaskError, match="reserves for the parts"):
        encode(clash, codec(Codec.INT8), rng=rng())
    with pytest.raises(TaskError, match="reserves for the parts"):
        Aggregator(
            federation_config(compression=codec(Codec.INT8)), FedAvg(), {**tiny_weights, **clash}
        )


def test_the_model_travels_cast_and_comes_back_in_its_dtypes(tiny_weights: Weights) -> None:
    weights = {**tiny_weights, "d": np.array([1 / 3, 2.5], np.float64)}
    for which in (ModelCodec.FLOAT16, ModelCodec.BFLOAT16):
        sent = encode_model(weights, which)
        assert list(sent) == ["w@float32", "b@float32", "steps", "d@float64"]
        assert sent["w@float32"].dtype == dtype_from_name(which.value)
        back = decode_model(sent, which)
        assert specs_of(back) == specs_of(weights)
        np.testing.assert_allclose(as64(back["d"]), as64(weights["d"]), rtol=2.0**-7)
    with pytest.raises(ModelRejected, match="is not a float16 cast"):
        decode_model({"w@float32": np.ones(2, np.float32)}, ModelCodec.FLOAT16)


# ------------------------------------------------------------------ the plan


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(PlanError) as info:
        validate_plan(raw)
    return info.value.problems


def test_the_plan_names_what_to_set() -> None:
    plan = validate_plan({"compression": {"update": "topk", "topk_fraction": 0.05}})
    assert plan.compression.settings() == codec(Codec.TOPK, topk_fraction=0.05)
    assert validate_plan({}).compression.settings() == Compression()
    problems = problems_of(
        {"compression": {"update": "int4", "topk_fraction": 0, "model": "int8", "level": 3}}
    )
    assert any(p.startswith("compression.update: must be one of") for p in problems)
    assert any(p.startswith("compression.topk_fraction: must be > 0") for p in problems)
    assert any(
        p.startswith("compression.model: must be one of 'none', 'float16' or 'bfloat16'")
        for p in problems
    )
    assert any(p.startswith("compression.level: unknown key") for p in problems)


@pytest.mark.parametrize("lossy", ["float16", "bfloat16", "int8", "topk"])
def test_lossy_codecs_are_refused_under_secure_aggregation_and_dp(lossy: str) -> None:
    secagg = problems_of(
        {"sites": 4, "compression": {"update": lossy}, "privacy": {"secure_aggregation": True}}
    )
    assert secagg == [
        f"compression.update: {lossy} is lossy, and secure aggregation sends each update as "
        "masked fixed-point integers: a lossy codec applied to them would break the unmasking "
        "of the sum, and applied before the masking it would save nothing (masked values are "
        "as wide as the ring and random); set compression.update to none or zstd, or remove "
        "privacy.secure_aggregation"
    ]
    (dp,) = problems_of({"compression": {"update": lossy}, "privacy": {"dp": {"clip": 1.0}}})
    assert dp.startswith(f"compression.update: {lossy} changes the update after the site clipped")
    assert "privacy.dp.clip" in dp and dp.endswith("set compression.update to none or zstd "
                                                   "(lossless), or remove privacy.dp")  # fmt: skip


def test_zstd_and_a_cast_model_go_with_every_privacy_setting() -> None:
    plan = validate_plan(
        {
            "sites": 4,
            "compression": {"update": "zstd", "model": "bfloat16"},
            "privacy": {"secure_aggregation": True, "dp": {"noise": "distributed"}},
        }
    )
    assert plan.compression.update is Codec.ZSTD


# ---------------------------------------------- the aggregator and the sites


class PatternRunner:
    """A site's runner with a fixed, non-trivial update: ``sin`` of a site-and-round
    dependent ramp, for every float tensor; +1 on integer counters."""

    def __init__(self, index: int, samples: int = 10) -> None:
        self.index = index
        self.samples = samples
        self.calls: list[tuple[Instruction, Weights]] = []

    @staticmethod
    def delta(weights: Weights, index: int, round: int) -> Weights:
        out: Weights = {}
        for name, array in weights.items():
            if np.issubdtype(array.dtype, np.integer):
                out[name] = np.ones_like(array)
                continue
            ramp = np.arange(array.size, dtype=np.float64) * (index + 1) + round
            out[name] = (np.sin(ramp) / 8).reshape(array.shape).astype(array.dtype)
        return out

    def __call__(self, instruction: Instruction, weights: Weights) -> SiteAnswer:
        self.calls.append((instruction, weights))
        if instruction.kind is InstructionKind.EVALUATE:
            return SiteAnswer(self.samples, {"loss": 0.0}, None)
        delta = self.delta(weights, self.index, instruction.round)
        return SiteAnswer(self.samples, {"loss": 1.0}, delta)


def model() -> Weights:
    return {
        "w": np.linspace(-1, 1, 64 * 96, dtype=np.float32).reshape(64, 96),
        "b": np.zeros(96, np.float32),
        "steps": np.array(0, np.int64),
    }


def test_a_malformed_encoded_update_is_refused_for_its_site_and_the_round_goes_on(
    make_federation: Any,
) -> None:
    compression = codec(Codec.INT8)
    fed = make_federation(
        model(), rounds=1, min_fraction=0.5, final_evaluation=False, compression=compression
    )
    fed.start()
    fed.log.wait_opened(1)
    # site-c uploads by hand: an int8 encoding whose scale is NaN
    conn = fed.connect("site-c")
    instruction = conn.get_instruction(1.0)
    encoded = encode(PatternRunner.delta(model(), 2, 1), compression, rng=rng())
    encoded["w@scale"] = np.full_like(encoded["w@scale"], np.nan)
    header = UpdateHeader(1, 10, specs_of(encoded), {}, instruction.attempt_id)
    receipt = conn.upload(header, iter_chunks(encoded))
    assert not receipt.accepted
    assert receipt.reason == "tensor 'w': its int8 scale holds NaN, infinite or negative values"
    site = SiteCompression(compression, seed=0)
    for index, name in enumerate(("site-a", "site-b")):
        fed.sites[name] = _collaborate(fed.connect(name), PatternRunner(index), site)
    history = fed.finish()
    first = history[0]
    assert first.close_reason is CloseReason.QUORUM
    assert [r.site for r in first.results] == ["site-a", "site-b"]
    (failure,) = first.failures
    assert failure.site == "site-c" and failure.kind is FailureKind.REJECTED
    assert "int8 scale holds NaN" in failure.reason


def _collaborate(connection: Any, runner: Any, site: SiteCompression, **kwargs: Any) -> Worker:
    collaborator = Collaborator(connection, runner, compression=site, **kwargs)
    return Worker(f"collaborator {connection.site!r}", collaborator.run)


def expected_mean_update(rounds: int, sites: int = 3) -> Weights:
    """What FedAvg (equal weights) makes of the pattern updates, uncompressed."""
    weights = model()
    for rnd in range(1, rounds + 1):
        deltas = [PatternRunner.delta(weights, i, rnd) for i in range(sites)]
        for name in ("w", "b"):
            mean = np.mean([as64(d[name]) for d in deltas], axis=0)
            weights[name] = (as64(weights[name]) + mean).astype(np.float32)
    return weights


@pytest.mark.parametrize("which", [Codec.INT8, Codec.ZSTD, Codec.FLOAT16, Codec.TOPK])
def test_compressed_updates_are_decoded_before_the_accumulator_and_audited_as_sent(
    make_federation: Any, tmp_path: Path, which: Codec
) -> None:
    compression = codec(which, topk_fraction=0.5)
    fed = make_federation(model(), rounds=2, compression=compression)
    fed.start()
    site = SiteCompression(compression, seed=7)
    audit = AuditLog(tmp_path / "audit.jsonl")
    for index, name in enumerate(("site-a", "site-b", "site-c")):
        extra = {"audit": audit} if name == "site-a" else {}
        fed.sites[name] = _collaborate(fed.connect(name), PatternRunner(index), site, **extra)
    history = fed.finish()
    assert all(not r.failures for r in history)
    final, exact = fed.aggregator.weights, expected_mean_update(2)
    assert specs_of(final) == specs_of(model())
    assert int(final["steps"]) == 2
    error = np.abs(as64(final["w"]) - as64(exact["w"])).max()
    bound = {Codec.ZSTD: 1e-6, Codec.FLOAT16: 1e-3, Codec.INT8: 2 * 0.25 / 127, Codec.TOPK: 0.25}
    assert error <= bound[which]
    updates = [r for r in read_records(tmp_path / "audit.jsonl") if r["kind"] == "update"]
    assert len(updates) == 2
    for record in updates:
        assert record["privacy"]["compression"]["codec"] == which.value
        names = [t["name"] for t in record["tensors"]]
        assert names == list(encode(model(), compression, rng=rng()))


def test_over_grpc_with_mutual_tls_updates_travel_as_int8_and_signed_models_as_float16(
    tmp_path: Path,
) -> None:
    compression = Compression(update=Codec.INT8, model=ModelCodec.FLOAT16)
    sites = ("site-a", "site-b", "site-c")
    config = federation_config(roster=sites, rounds=3, round_deadline=30.0, compression=compression)
    service = Later(config)  # the PKI the transport makes holds the aggregator's key
    transport = GrpcTestTransport(service, roster=sites, workspace=tmp_path)
    key = server_credentials(tmp_path / "pki").key_pem
    aggregator = Aggregator(config, FedAvg(), model(), signer=signer_from_pem(key))
    service.target = aggregator
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "aggregator.crt").read_bytes())
    site = SiteCompression(compression, seed=0)
    runners = [PatternRunner(i) for i in range(len(sites))]
    try:
        for name, runner in zip(sites, runners, strict=True):
            collaborator = Collaborator(
                transport.connect(name), runner, check_model=model_checker(cert), compression=site
            )
            threading.Thread(target=_run_quietly, args=(collaborator,), daemon=True).start()
        history = aggregator.run()
    finally:
        transport.close()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 4
    for runner in runners:  # each site's task got the model back in its own dtypes
        for _, weights in runner.calls:
            assert specs_of(weights) == specs_of(model())
    error = np.abs(as64(aggregator.weights["w"]) - as64(expected_mean_update(3)["w"])).max()
    assert error < 0.05  # int8 updates from float16-rounded models
    float32_bytes = sum(a.nbytes for a in model().values())
    uploads, downloads = 3 * 3, 3 * 4  # sites x training rounds; the final evaluation too
    assert transport.traffic.received * 3.5 < uploads * float32_bytes
    assert transport.traffic.sent * 1.8 < downloads * float32_bytes


class Later:
    """The aggregator's service, handed to the transport before the aggregator exists."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.target: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


def _run_quietly(collaborator: Collaborator) -> None:
    try:
        collaborator.run()
    except (FedloomError, ValueError):
        pass  # the test closed the channel under it (grpc: "closed channel")


# ---------------------------------------------------- the digits federation


@pytest.mark.slow
def test_digits_learns_as_well_with_int8_and_topk_updates_for_a_fraction_of_the_bytes(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "digits")
    base = ["rounds=10"]
    options = SimulationOptions(workers=0)
    plain = simulate(ws, load_plan(ws, base), options)
    int8 = simulate(ws, load_plan(ws, [*base, "compression.update=int8"]), options)
    topk = simulate(
        ws,
        load_plan(ws, [*base, "compression.update=topk", "compression.topk_fraction=0.1"]),
        options,
    )
    accuracy = plain.test_metrics["accuracy"]
    assert accuracy > 0.85
    assert int8.test_metrics["accuracy"] >= accuracy - 0.02
    assert topk.test_metrics["accuracy"] >= accuracy - 0.05
    for compressed in (int8, topk):
        assert compressed.bytes_received * 3.5 <= plain.bytes_received
        assert compressed.bytes_sent == plain.bytes_sent  # the model travels as it was
        assert all(not r.failures for r in compressed.history)
    cast = simulate(ws, load_plan(ws, [*base, "compression.model=bfloat16"]), options)
    assert cast.bytes_sent * 1.9 < plain.bytes_sent
    assert cast.test_metrics["accuracy"] >= accuracy - 0.02


@pytest.mark.slow
def test_a_deployed_federation_of_os_processes_compresses_both_ways(tmp_path: Path) -> None:
    """The aggregator and each collaborator as their own processes (``simulate
    --transport grpc``): sites encode with the plan's codec, record it in their audit
    log, and decode the cast model."""
    ws = make_workspace(tmp_path, "breast-cancer")
    proc = run_cli(
        "simulate", str(ws), "--sites", "2", "--rounds", "2", "--transport", "grpc",
        "--run-name", "packed", "--quiet", "compression.update=int8", "compression.model=float16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads((ws / "runs" / "packed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failures"] == 0
    assert summary["test_accuracy"] > 0.8
    for site in ("site-01", "site-02"):
        records = read_records(ws / "sites" / site / "audit.jsonl")
        updates = [r for r in records if r["kind"] == "update"]
        assert len(updates) == 2
        for record in updates:
            assert record["privacy"]["compression"] == {"codec": "int8", "block": INT8_BLOCK}
            assert [(t["name"], t["dtype"]) for t in record["tensors"]] == [
                ("weight", "int8"),
                ("weight@scale", "float32"),
                ("bias", "int8"),
                ("bias@scale", "float32"),
            ]
