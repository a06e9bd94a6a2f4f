"""The transport contract: one suite, run against every transport.

Each test drives a real :class:`~fedloom.aggregator.Aggregator` and real
:class:`~fedloom.collaborator.Collaborator` threads through ``transport_factory``. A
transport joins the suite by adding an entry to :data:`TRANSPORTS`: a callable that takes
the aggregator's service and returns an object with ``connect(site) -> Connection`` and a
``traffic`` counter (``sent`` / ``received`` bytes), and optionally ``close()``, which the
fixture calls at teardown (a gRPC entry starts a loopback server and stops it there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import attempt_id
from grpcnet import GrpcTestTransport

from fedloom.core.errors import TransportError
from fedloom.core.records import CloseReason, Ending, FailureKind, InstructionKind
from fedloom.core.weights import Weights, nbytes, specs_of, weights_equal
from fedloom.transport import (
    Chunk,
    FailureReport,
    InProcessTransport,
    UpdateHeader,
    iter_chunks,
)

TRANSPORTS: dict[str, Callable[[Any], Any]] = {
    "inprocess": lambda service: InProcessTransport(service, roundtrip=False),
    "inprocess-roundtrip": lambda service: InProcessTransport(service, roundtrip=True),
    "grpc": GrpcTestTransport,
}

SITES = ("site-a", "site-b", "site-c")
SAMPLES = (10, 30, 60)


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.server] if name == "grpc" else [])
        for name in TRANSPORTS
    ]
)
def transport_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[Any], Any]]:
    made: list[Any] = []

    def make(service: Any) -> Any:
        transport = TRANSPORTS[request.param](service)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        close = getattr(transport, "close", None)
        if close is not None:
            close()


def upload(conn: Any, round: int, delta: Weights, samples: int) -> Any:
    header = UpdateHeader(round, samples, specs_of(delta), {"loss": 0.5}, attempt_id(round))
    return conn.upload(header, iter_chunks(delta))


def run_federation(
    make_federation: Any,
    weights: Weights,
    runner_cls: Any,
    transport: Callable[[Any], Any],
    *,
    order: tuple[str, ...] = SITES,
) -> Any:
    """Three sites, two training rounds and the final evaluation; sites start in ``order``."""
    fed = make_federation(weights, transport=transport)
    fed.start()
    for site in order:
        index = SITES.index(site)
        fed.start_site(site, runner_cls(index, SAMPLES[index]))
    fed.history = fed.finish()
    return fed


def hand_computed(initial: Weights, runner_cls: Any, rounds: int) -> dict[str, np.ndarray]:
    """FedAvg by hand: each round adds the sample-weighted mean delta, in float64."""
    current = {name: a.astype(np.float64) for name, a in initial.items()}
    total = sum(SAMPLES)
    for rnd in range(1, rounds + 1):
        for name in current:
            mean = sum(n * runner_cls.delta(i, rnd)[name] for i, n in enumerate(SAMPLES)) / total
            current[name] = (current[name] + mean).astype(initial[name].dtype).astype(np.float64)
    return current


def test_federation_reaches_the_hand_computed_weighted_mean(
    make_federation: Any, tiny_weights: Weights, shift_runner: Any, transport_factory: Any
) -> None:
    fed = run_federation(make_federation, tiny_weights, shift_runner, transport_factory)

    kinds = [r.kind for r in fed.history]
    assert kinds == [InstructionKind.TRAIN, InstructionKind.TRAIN, InstructionKind.EVALUATE]
    for record in fed.history:
        assert record.close_reason is CloseReason.ALL_ANSWERED
        assert [r.site for r in record.results] == list(SITES)
        assert [r.num_samples for r in record.results] == list(SAMPLES)
        assert record.failures == ()

    final = fed.aggregator.weights
    assert specs_of(final) == specs_of(tiny_weights)
    want = hand_computed(tiny_weights, shift_runner, rounds=2)
    for name in ("w", "b"):
        np.testing.assert_allclose(final[name].astype(np.float64), want[name], rtol=0, atol=1e-6)
    # every site adds 1 to the counter each round: the mean is exactly 1
    np.testing.assert_array_equal(final["steps"], tiny_weights["steps"] + 2)
    # the evaluation's loss is the sample-weighted mean of each site's index
    assert fed.history[-1].metrics["loss"] == pytest.approx(
        sum(i * n for i, n in enumerate(SAMPLES)) / sum(SAMPLES)
    )


def test_final_weights_are_bit_identical_to_the_reference_transport(
    make_federation: Any, tiny_weights: Weights, shift_runner: Any, transport_factory: Any
) -> None:
    reference = run_federation(make_federation, tiny_weights, shift_runner, TRANSPORTS["inprocess"])
    under_test = run_federation(
        make_federation, tiny_weights, shift_runner, transport_factory, order=SITES[::-1]
    )
    assert weights_equal(under_test.aggregator.weights, reference.aggregator.weights)
    assert [r.results for r in under_test.history] == [r.results for r in reference.history]


def test_traffic_counter_counts_the_bytes_both_ways(
    make_federation: Any, tiny_weights: Weights, shift_runner: Any, transport_factory: Any
) -> None:
    fed = run_federation(make_federation, tiny_weights, shift_runner, transport_factory)
    model_bytes = nbytes(tiny_weights)
    downloads = 3 * len(SITES)  # two training rounds and the evaluation
    uploads = 2 * len(SITES)  # evaluation answers carry no tensors
    traffic = fed.transport.traffic
    assert downloads * model_bytes <= traffic.sent <= downloads * (model_bytes + 512)
    assert uploads * model_bytes <= traffic.received <= uploads * (model_bytes + 512)


def test_sites_are_told_the_federation_finished(
    make_federation: Any, tiny_weights: Weights, shift_runner: Any, transport_factory: Any
) -> None:
    fed = run_federation(make_federation, tiny_weights, shift_runner, transport_factory)
    # finish() joined every collaborator: each left run() on its own
    assert all(not w.thread.is_alive() for w in fed.sites.values())
    for site in SITES:
        task = fed.connect(site).get_instruction(timeout=0)
        assert task is not None
        assert task.kind is InstructionKind.FINISHED


@pytest.mark.parametrize("call", ["get_instruction", "download", "upload", "report_failure"])
def test_site_outside_the_roster_is_refused(
    call: str,
    make_federation: Any,
    tiny_weights: Weights,
    shift_runner: Any,
    transport_factory: Any,
) -> None:
    fed = make_federation(tiny_weights, transport=transport_factory, rounds=1)
    fed.start()
    fed.log.wait_opened(1)
    calls = {
        "get_instruction": lambda conn: conn.get_instruction(timeout=0),
        "download": lambda conn: conn.download(1),
        "upload": lambda conn: upload(conn, 1, shift_runner.delta_like(tiny_weights, 0, 1), 5),
        "report_failure": lambda conn: conn.report_failure(FailureReport(1, "let me in")),
    }
    with pytest.raises(TransportError, match="'mallory'"):
        calls[call](fed.connect("mallory"))

    for index, site in enumerate(SITES):
        fed.start_site(site, shift_runner(index, SAMPLES[index]))
    history = fed.finish()
    named = [r.site for rec in history for r in rec.results]
    named += [f.site for rec in history for f in rec.failures]
    assert "mallory" not in named
    assert history[0].close_reason is CloseReason.ALL_ANSWERED


def test_messages_carry_no_sender() -> None:
    for message in (UpdateHeader, Chunk, FailureReport):
        fields = {f.name for f in dataclasses.fields(message)}
        assert not fields & {"site", "sender", "site_name", "identity"}, message


def test_identity_comes_from_the_connection(
    make_federation: Any, tiny_weights: Weights, shift_runner: Any, transport_factory: Any
) -> None:
    fed = make_federation(
        tiny_weights,
        transport=transport_factory,
        roster=("site-a", "site-b"),
        sites_per_round=2,
        rounds=1,
        final_evaluation=False,
    )
    fed.start()
    fed.log.wait_opened(1)
    conn_a = fed.connect("site-a")
    assert conn_a.site == "site-a"
    delta_a = shift_runner.delta_like(tiny_weights, 0, 1)
    delta_b = shift_runner.delta_like(tiny_weights, 5, 1)

    assert upload(conn_a, 1, delta_a, 7).accepted
    assert [(e.site, e.accepted) for e in fed.log.answered(1)] == [("site-a", True)]
    # site-a's connection trying to answer "for site-b" is just site-a answering again
    second = upload(conn_a, 1, delta_b, 5)
    assert not second.accepted
    assert "'site-a' already answered round 1" in second.reason
    assert [e.site for e in fed.log.answered(1)] == ["site-a"]  # site-b still pending

    assert upload(fed.connect("site-b"), 1, delta_b, 5).accepted
    (record,) = fed.finish()
    assert [(r.site, r.num_samples) for r in record.results] == [("site-a", 7), ("site-b", 5)]
    mean_w = (7 * delta_a["w"].astype(np.float64) + 5 * delta_b["w"].astype(np.float64)) / 12
    np.testing.assert_allclose(
        fed.aggregator.weights["w"], (tiny_weights["w"] + mean_w).astype(np.float32), atol=1e-6
    )


def test_rejection_reason_reaches_the_site(
    make_federation: Any, tiny_weights: Weights, shift_runner: Any, transport_factory: Any
) -> None:
    fed = make_federation(tiny_weights, transport=transport_factory, rounds=1, min_fraction=0.5)
    fed.start()
    fed.log.wait_opened(1)
    bad = {k: v.copy() for k, v in tiny_weights.items()}
    bad["b"][2] = np.nan
    receipt = upload(fed.connect("site-a"), 1, bad, 10)
    assert not receipt.accepted
    assert receipt.round == 1
    assert "'b'" in receipt.reason and "NaN" in receipt.reason

    for index, site in enumerate(SITES):  # site-a carries on: it answers the evaluation
        fed.start_site(site, shift_runner(index, SAMPLES[index]))
    history = fed.finish()
    assert [r.site for r in history[-1].results] == list(SITES)
    record = history[0]
    assert [f.site for f in record.failures] == ["site-a"]
    assert record.failures[0].kind is FailureKind.REJECTED
    assert record.failures[0].reason == receipt.reason
    assert [r.site for r in record.results] == ["site-b", "site-c"]
    assert np.isfinite(fed.aggregator.weights["b"]).all()


class RollCall:
    """A toy round step: each site says hello before training; the aggregator's handler
    answers with the name the transport says the site has."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, int, bytes]] = []

    def __call__(self, site: str, round: int, payload: bytes) -> bytes:
        self.heard.append((site, round, payload))
        return f"seen {site} in round {round}".encode()


class SaysHello:
    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def run(self, instruction: Any, exchange: Callable[[bytes], bytes]) -> None:
        self.replies.append(exchange(b"hello"))


def test_a_round_phase_runs_before_training_with_identity_from_the_channel(
    make_federation: Any, shift_runner: Any, tiny_weights: Weights, transport_factory: Any
) -> None:
    roll_call = RollCall()
    fed = make_federation(
        tiny_weights, transport=transport_factory, exchange_steps={"hello": roll_call}
    )
    hellos = {site: SaysHello() for site in SITES}
    for index, site in enumerate(SITES):
        fed.start_site(site, shift_runner(index, SAMPLES[index]), {"hello": hellos[site]})
    fed.start()
    history = fed.finish()
    assert all(r.close_reason is CloseReason.ALL_ANSWERED for r in history)
    assert sorted(roll_call.heard) == sorted(
        (site, rnd, b"hello") for site in SITES for rnd in (1, 2)
    )
    for site, hello in hellos.items():
        assert hello.replies == [f"seen {site} in round {r}".encode() for r in (1, 2)]


def test_a_site_without_a_phase_fails_the_round_with_a_reason(
    make_federation: Any, shift_runner: Any, tiny_weights: Weights, transport_factory: Any
) -> None:
    fed = make_federation(
        tiny_weights, transport=transport_factory, exchange_steps={"hello": RollCall()}, rounds=1,
        min_fraction=0.5,
    )  # fmt: skip
    for index, site in enumerate(SITES):
        exchange_steps = {} if site == "site-c" else {"hello": SaysHello()}
        fed.start_site(site, shift_runner(index, SAMPLES[index]), exchange_steps)
    fed.start()
    first = fed.finish()[0]
    assert [r.site for r in first.results] == ["site-a", "site-b"]
    [failure] = first.failures
    assert failure.site == "site-c" and failure.kind is FailureKind.ERROR
    assert "does not support the round step 'hello'" in failure.reason


def test_sites_hear_whether_the_federation_completed(
    make_federation: Any, tiny_weights: Weights, shift_runner: Any, transport_factory: Any
) -> None:
    from fedloom.core.errors import QuorumError

    fed = make_federation(tiny_weights, transport=transport_factory, rounds=1)
    fed.start()
    fed.log.wait_opened(1)
    fed.pass_deadline()  # nobody answered: no quorum, no retries left
    with pytest.raises(QuorumError):
        fed.loop.join()
    told = fed.connect("site-a").get_instruction(timeout=0)
    assert told is not None and told.kind is InstructionKind.FINISHED
    assert told.ending is Ending.STOPPED  # it resumes: sites wait

    done = run_federation(make_federation, tiny_weights, shift_runner, transport_factory)
    assert done.connect("site-a").get_instruction(timeout=0).ending is Ending.COMPLETED


def test_sites_hear_that_the_federation_was_cancelled(
    make_federation: Any, tiny_weights: Weights, transport_factory: Any
) -> None:
    from fedloom.core.errors import Cancelled

    fed = make_federation(tiny_weights, transport=transport_factory, rounds=2)

    def cancel(name: str, context: dict[str, Any]) -> None:
        raise Cancelled("cancelled with `fedloom aggregator stop --cancel`")

    fed.faults.arm("round.opened", cancel)  # `fedloom aggregator stop --cancel`
    fed.start()
    with pytest.raises(Cancelled):
        fed.loop.join()
    told = fed.connect("site-a").get_instruction(timeout=0)
    assert told is not None and told.kind is InstructionKind.FINISHED
    assert told.ending is Ending.CANCELLED  # over: sites stop
