"""The round loop against bad input, silence, failure and faults.

A real Aggregator runs in a thread on a ManualClock (deadlines pass only when a test
advances it); sites answer through real in-process connections, either by hand (to send
exactly the bytes a test wants) or as Collaborator threads. The model's counter is a
1-element vector here, so these tests isolate the loop from 0-d tensor handling, which
the transport contract suite and test_accumulate cover.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SpoolWatch, attempt_id

from fedloom.accumulate import MeanAccumulator
from fedloom.accumulate import mean as mean_module
from fedloom.aggregator import Aggregator
from fedloom.collaborator import Collaborator
from fedloom.core.errors import FaultInjected, QuorumError, TransportError
from fedloom.core.events import RoundClosed, RoundOpened, SiteAnswered, UploadBroke
from fedloom.core.records import (
    CloseReason,
    Failure,
    FailureKind,
    Instruction,
    InstructionKind,
    SiteAnswer,
)
from fedloom.core.rng import select_sites
from fedloom.core.weights import TensorSpec, Weights, specs_of, weights_equal
from fedloom.strategies import FedAvg
from fedloom.transport import (
    Chunk,
    FailureReport,
    InProcessTransport,
    UpdateHeader,
    assemble,
    iter_chunks,
)

WAIT = 10.0
SITES = ("site-a", "site-b", "site-c")


def model() -> Weights:
    return {
        "w": (np.arange(12, dtype=np.float32).reshape(3, 4) / 4 - 1).astype(np.float32),
        "b": np.array([0.5, -0.25, 0.0, 1.0], dtype=np.float32),
        "steps": np.array([0], dtype=np.int64),
    }


def send(
    conn: Any,
    round: int,
    delta: Weights,
    samples: int = 10,
    *,
    specs: tuple[TensorSpec, ...] | None = None,
    chunks: Iterable[Chunk] | None = None,
    metrics: dict[str, float] | None = None,
    attempt: int = 1,
) -> Any:
    header = UpdateHeader(
        round,
        samples,
        specs_of(delta) if specs is None else specs,
        metrics or {},
        attempt_id(round, attempt),
    )
    return conn.upload(header, iter_chunks(delta, 8) if chunks is None else chunks)


def answer(fed: Any, runner_cls: Any, site: str, round: int, samples: int) -> Any:
    """Download the round's model and send the site's ShiftRunner delta for it."""
    conn = fed.connect(site)
    stream = conn.download(round)
    weights = assemble(stream.header.tensors, stream.chunks)
    delta = runner_cls.delta_like(weights, SITES.index(site) if site in SITES else 7, round)
    receipt = send(conn, round, delta, samples)
    assert receipt.accepted, receipt.reason
    return receipt


def fedavg_by_hand(initial: Weights, rounds: list[list[tuple[Weights, int]]]) -> Weights:
    current = {k: v.copy() for k, v in initial.items()}
    for updates in rounds:
        total = sum(n for _, n in updates)
        for name, base in current.items():
            mean = sum(n * d[name].astype(np.float64) for d, n in updates) / total
            value = base.astype(np.float64) + mean
            current[name] = (
                value.astype(base.dtype)
                if base.dtype.kind == "f"
                else np.rint(value).astype(base.dtype)
            )
    return current


def assert_weights(got: Weights, want: Weights) -> None:
    assert specs_of(got) == specs_of(want)
    for name in want:
        if want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(got[name], want[name])


def one_round(make_federation: Any, **overrides: Any) -> Any:
    options: dict[str, Any] = {"rounds": 1, "final_evaluation": False, "min_fraction": 0.5}
    options.update(overrides)
    fed = make_federation(model(), **options)
    fed.start()
    fed.log.wait_opened(1)
    return fed


# ---------------------------------------------------------------- bad updates


def _with(name: str, index: tuple[int, ...], value: float) -> Weights:
    delta = {k: np.zeros_like(v) for k, v in model().items()}
    delta[name][index] = value
    return delta


def _zeros() -> Weights:
    return {k: np.zeros_like(v) for k, v in model().items()}


def _reshaped_w() -> Weights:
    return {**_zeros(), "w": np.zeros((4, 3), np.float32)}


def _float64_w() -> Weights:
    return {**_zeros(), "w": np.zeros((3, 4), np.float64)}


def _truncated() -> list[Chunk]:
    return list(iter_chunks(_zeros(), 8))[:-1]


def _overlong() -> list[Chunk]:
    chunks = list(iter_chunks(_zeros(), 8))
    b_end = [c for c in chunks if c.tensor == 1][-1]
    at = chunks.index(b_end) + 1
    return [*chunks[:at], Chunk(1, 16, b"\x00" * 4), *chunks[at:]]


BAD: dict[str, tuple[Callable[[Any], Any], list[str]]] = {
    "nan": (lambda c: send(c, 1, _with("w", (2, 1), np.nan)), ["'w'", "NaN"]),
    "inf": (lambda c: send(c, 1, _with("b", (0,), -np.inf)), ["'b'", "NaN or Inf"]),
    "wrong-shape": (
        lambda c: send(c, 1, _reshaped_w()),
        ["'w'", "float32[4, 3]", "float32[3, 4]"],
    ),
    "wrong-dtype": (lambda c: send(c, 1, _float64_w()), ["'w'", "float64[3, 4]"]),
    "missing-tensor": (
        lambda c: send(c, 1, {k: v for k, v in _zeros().items() if k != "b"}),
        ["2 tensors", "global model 3"],
    ),
    "truncated-stream": (
        lambda c: send(c, 1, _zeros(), chunks=_truncated()),
        ["'steps'", "ended early"],
    ),
    "larger-than-announced": (
        lambda c: send(c, 1, _zeros(), chunks=_overlong()),
        ["'b'", "larger than announced"],
    ),
    "no-samples": (lambda c: send(c, 1, _zeros(), samples=0), ["sample count", "got 0"]),
    "nan-metric": (
        lambda c: send(c, 1, _zeros(), metrics={"loss": float("nan")}),
        ["'loss'", "nan"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_update_is_rejected_and_the_round_completes(
    case: str, make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    attempt, words = BAD[case]
    receipt = attempt(fed.connect("site-a"))
    assert not receipt.accepted
    for word in words:
        assert word in receipt.reason
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()

    assert record.failures == (Failure("site-a", 1, FailureKind.REJECTED, receipt.reason),)
    assert [r.site for r in record.results] == ["site-b", "site-c"]
    assert record.close_reason is CloseReason.QUORUM
    assert SiteAnswered(1, "site-a", False, receipt.reason) in fed.log.snapshot()
    # nothing of the rejected update reached the model
    start = model()
    deltas = [(shift_runner.delta_like(start, i, 1), n) for i, n in ((1, 20), (2, 30))]
    assert_weights(fed.aggregator.weights, fedavg_by_hand(start, [deltas]))


def test_update_for_a_closed_or_future_round_is_refused(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), rounds=2, final_evaluation=False)
    fed.start()
    fed.log.wait_opened(1)
    for site in SITES:
        answer(fed, shift_runner, site, 1, 10)
    fed.log.wait_opened(2)

    late = send(fed.connect("site-a"), 1, _with("w", (0, 0), 100.0))
    assert not late.accepted
    assert "round 1 is not open (open round: 2)" in late.reason
    early = send(fed.connect("site-b"), 3, _with("w", (0, 0), 100.0))
    assert not early.accepted and "round 3 is not open" in early.reason

    for site in SITES:  # the refused uploads did not settle anyone for round 2
        answer(fed, shift_runner, site, 2, 10)
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 2
    assert all(r.failures == () for r in history)
    after = send(fed.connect("site-c"), 2, _zeros())
    assert not after.accepted and "round 2 is not open (open round: none)" in after.reason

    start = model()
    rounds = [[(shift_runner.delta_like(start, i, r), 10) for i in range(3)] for r in (1, 2)]
    assert_weights(fed.aggregator.weights, fedavg_by_hand(start, rounds))


def test_update_still_streaming_when_the_deadline_passes_is_refused(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    entered, release = threading.Event(), threading.Event()

    def hold(name: str, context: dict[str, Any]) -> None:
        if context["site"] == "site-a":
            entered.set()
            release.wait(WAIT)

    fed.faults.arm("upload.receiving", hold)
    slow = fed.spawn("slow upload", lambda: send(fed.connect("site-a"), 1, _with("w", (0, 0), 9.0)))
    assert entered.wait(WAIT)
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    fed.pass_deadline()
    fed.log.wait_until(lambda evs: any(isinstance(e, RoundClosed) for e in evs), "round close")
    release.set()
    receipt = slow.join()
    (record,) = fed.finish()

    assert not receipt.accepted
    assert "round 1 closed while the update streamed" in receipt.reason
    assert record.close_reason is CloseReason.DEADLINE_QUORUM
    assert [(f.site, f.kind) for f in record.failures] == [("site-a", FailureKind.TIMEOUT)]
    start = model()
    deltas = [(shift_runner.delta_like(start, i, 1), n) for i, n in ((1, 20), (2, 30))]
    assert_weights(fed.aggregator.weights, fedavg_by_hand(start, [deltas]))


def test_upload_by_a_site_not_selected_is_refused(make_federation: Any, shift_runner: Any) -> None:
    fed = one_round(make_federation, sites_per_round=2, seed=3)
    opened = fed.log.wait_opened(1)
    assert len(opened.selected) == 2
    (outsider,) = set(SITES) - set(opened.selected)

    conn = fed.connect(outsider)
    assert conn.get_instruction(timeout=0) is None  # nothing to do for it this round
    receipt = send(conn, 1, _zeros())
    assert not receipt.accepted
    assert f"site {outsider!r} was not selected for round 1" in receipt.reason

    for site in opened.selected:
        answer(fed, shift_runner, site, 1, 10)
    (record,) = fed.finish()
    assert record.selected == opened.selected
    assert record.close_reason is CloseReason.ALL_ANSWERED
    assert outsider not in [r.site for r in record.results] + [f.site for f in record.failures]


def test_duplicate_upload_is_refused_and_the_first_counts(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    conn = fed.connect("site-a")
    first = shift_runner.delta_like(model(), 0, 1)
    assert send(conn, 1, first, 10).accepted
    again = send(conn, 1, _with("w", (1, 1), 50.0), 99)
    assert not again.accepted
    assert "'site-a' already answered round 1" in again.reason
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()

    assert [(r.site, r.num_samples) for r in record.results] == [
        ("site-a", 10),
        ("site-b", 20),
        ("site-c", 30),
    ]
    assert record.failures == ()
    start = model()
    deltas = [(shift_runner.delta_like(start, i, 1), n) for i, n in enumerate((10, 20, 30))]
    assert_weights(fed.aggregator.weights, fedavg_by_hand(start, [deltas]))


def test_second_upload_while_the_first_streams_is_refused(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    entered, release = threading.Event(), threading.Event()

    def hold(name: str, context: dict[str, Any]) -> None:
        entered.set()
        release.wait(WAIT)

    fed.faults.arm("upload.receiving", hold)
    first = shift_runner.delta_like(model(), 0, 1)
    streaming = fed.spawn("first upload", lambda: send(fed.connect("site-a"), 1, first, 10))
    assert entered.wait(WAIT)
    fed.faults.disarm("upload.receiving")
    second = send(fed.connect("site-a"), 1, _with("w", (1, 1), 50.0), 99)
    release.set()
    assert streaming.join().accepted
    assert not second.accepted
    assert "'site-a' is already uploading" in second.reason
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()
    assert [(r.site, r.num_samples) for r in record.results][0] == ("site-a", 10)
    assert record.failures == ()


def test_stream_that_breaks_off_does_not_wedge_the_site(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    conn = fed.connect("site-a")
    delta = shift_runner.delta_like(model(), 0, 1)

    def breaks_off() -> Iterable[Chunk]:
        yield next(iter_chunks(delta, 8))
        raise TransportError("connection reset by peer")

    try:
        broken = send(conn, 1, delta, 10, chunks=breaks_off())
        assert not broken.accepted
    except TransportError:
        pass  # a transport may surface the break to the sender
    retry = send(conn, 1, delta, 10)
    assert "already uploading" not in retry.reason
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()  # settled without waiting for the deadline
    if retry.accepted:
        assert [r.site for r in record.results] == list(SITES)
    else:
        assert [(f.site, f.kind) for f in record.failures] == [("site-a", FailureKind.DISCONNECTED)]


# ------------------------------------------------------------- failing sites


def test_site_whose_task_fails_is_recorded_as_error(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), rounds=1, final_evaluation=False, min_fraction=0.5)

    def broken(instruction: Instruction, weights: Weights) -> SiteAnswer:
        raise RuntimeError("disk full")

    fed.start_site("site-a", broken)
    fed.start_site("site-b", shift_runner(1, 20))
    fed.start_site("site-c", shift_runner(2, 30))
    fed.start()
    (record,) = fed.finish()

    (failure,) = record.failures
    assert (failure.site, failure.round, failure.kind) == ("site-a", 1, FailureKind.ERROR)
    assert "RuntimeError: disk full" in failure.reason
    assert [r.site for r in record.results] == ["site-b", "site-c"]
    assert record.close_reason is CloseReason.QUORUM


def test_failure_report_is_recorded_and_a_stale_one_ignored(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    fed.connect("site-b").report_failure(FailureReport(7, "from another round"))
    fed.connect("site-a").report_failure(FailureReport(1, "out of memory", attempt_id(1)))
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()
    assert record.failures == (Failure("site-a", 1, FailureKind.ERROR, "out of memory"),)
    assert [r.site for r in record.results] == ["site-b", "site-c"]


# ----------------------------------------------------------------- deadlines

FOUR = ("site-a", "site-b", "site-c", "site-d")


def test_silent_site_times_out_every_round_and_quorum_closes_it(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(
        model(), roster=FOUR, sites_per_round=4, min_fraction=0.75, rounds=2, max_retries=0
    )
    for index, site in enumerate(FOUR[:3]):  # site-d never answers
        fed.start_site(site, shift_runner(index, 10 * (index + 1)))
    fed.start()
    for rnd in (1, 2, 3):  # two training rounds and the final evaluation
        fed.log.wait_answered(rnd, 3)
        assert not [e for e in fed.log.closed() if e.record.round == rnd]  # waits for d
        fed.pass_deadline()
        fed.log.wait_until(
            lambda evs, rnd=rnd: any(
                isinstance(e, RoundClosed) and e.record.round == rnd for e in evs
            ),
            f"round {rnd} to close",
        )
    history = fed.finish()

    assert [r.round for r in history] == [1, 2, 3]
    assert history[-1].kind is InstructionKind.EVALUATE
    for record in history:
        assert record.close_reason is CloseReason.DEADLINE_QUORUM
        assert [r.site for r in record.results] == list(FOUR[:3])
        (failure,) = record.failures
        assert (failure.site, failure.round, failure.kind) == (
            "site-d",
            record.round,
            FailureKind.TIMEOUT,
        )
    start = model()
    rounds = [
        [(shift_runner.delta_like(start, i, r), 10 * (i + 1)) for i in range(3)] for r in (1, 2)
    ]
    assert_weights(fed.aggregator.weights, fedavg_by_hand(start, rounds))


def test_no_quorum_retries_then_raises(make_federation: Any, shift_runner: Any) -> None:
    fed = make_federation(
        model(), roster=FOUR, sites_per_round=4, min_fraction=0.75, rounds=1, max_retries=1
    )
    for index, site in enumerate(FOUR[:2]):  # site-c and site-d never answer
        fed.start_site(site, shift_runner(index, 10))
    fed.start()
    for attempt in (1, 2):
        fed.log.wait_opened(1, attempt)
        fed.log.wait_answered(1, 2 * attempt)
        fed.pass_deadline()
    with pytest.raises(QuorumError) as info:
        fed.finish()

    message = str(info.value)
    assert "round 1: 2 of 4 sites answered (attempt 2); the round needs 3" in message
    assert "2 site(s), e.g. site-c: no answer before the round's deadline" in message
    closed = [e.record for e in fed.log.closed()]
    assert [(r.attempt, r.close_reason) for r in closed] == [
        (1, CloseReason.NO_QUORUM),
        (2, CloseReason.NO_QUORUM),
    ]
    # failed attempts stay in the history, with their failures
    assert fed.aggregator.history == closed
    assert_weights(fed.aggregator.weights, model())
    for worker in fed.sites.values():  # the sites were told the federation is over
        worker.join()


# ---------------------------------------------------------------- fault points


def test_fault_after_aggregation_stops_the_run_at_that_round(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), rounds=3)
    hits: list[int] = []

    def crash_in_round_2(name: str, context: dict[str, Any]) -> None:
        hits.append(context["round"])
        if context["round"] == 2:
            raise FaultInjected("simulated crash after aggregating round 2")

    fed.faults.arm("round.aggregated", crash_in_round_2)
    for index, site in enumerate(SITES):
        fed.start_site(site, shift_runner(index, 10))
    fed.start()
    with pytest.raises(FaultInjected, match="round 2"):
        fed.finish()

    assert hits == [1, 2]
    # round 2 aggregated but never finished: recorded as stopped, its model not kept
    history = fed.aggregator.history
    assert [(r.round, r.close_reason) for r in history] == [
        (1, CloseReason.ALL_ANSWERED),
        (2, CloseReason.STOPPED),
    ]
    assert [r.site for r in history[1].results] == list(SITES)  # what it had received
    assert not [e for e in fed.log.snapshot() if isinstance(e, RoundOpened) and e.round == 3]
    for worker in fed.sites.values():  # run() told every site to stop
        worker.join()
    for site in SITES:
        task = fed.connect(site).get_instruction(timeout=0)
        assert task is not None and task.kind is InstructionKind.FINISHED


# ------------------------------------------------------------------ selection

FIVE = ("site-a", "site-b", "site-c", "site-d", "site-e")


def selections(make_federation: Any, runner_cls: Any, order: tuple[str, ...], early: bool) -> list:
    fed = make_federation(
        model(), roster=FIVE, sites_per_round=2, rounds=4, seed=11, final_evaluation=False
    )
    if early:  # sites connect before the loop starts, or only once it runs
        for site in order:
            fed.start_site(site, runner_cls(FIVE.index(site), 10))
        fed.start()
    else:
        fed.start()
        fed.log.wait_opened(1)
        for site in order:
            fed.start_site(site, runner_cls(FIVE.index(site), 10))
    history = fed.finish()
    opened = [e.selected for e in fed.log.snapshot() if isinstance(e, RoundOpened)]
    assert opened == [r.selected for r in history]
    for record in history:
        assert len(record.selected) == 2 and set(record.selected) <= set(FIVE)
        assert [r.site for r in record.results] == list(record.selected)
    return [r.selected for r in history]


def test_selection_depends_on_seed_and_round_not_connection_order(
    make_federation: Any, shift_runner: Any
) -> None:
    first = selections(make_federation, shift_runner, FIVE, early=True)
    second = selections(make_federation, shift_runner, FIVE[::-1], early=False)
    third = selections(
        make_federation,
        shift_runner,
        ("site-c", "site-e", "site-a", "site-d", "site-b"),
        early=True,
    )
    assert first == second == third
    assert first == [tuple(select_sites(list(FIVE), 2, 11, r)) for r in range(1, 5)]


def test_final_evaluation_waits_for_every_site_even_when_one_fails(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), rounds=1, min_fraction=1.0)

    def fails_to_evaluate(instruction: Instruction, weights: Weights) -> SiteAnswer:
        if instruction.kind is InstructionKind.EVALUATE:
            raise RuntimeError("validation data missing")
        return shift_runner(0, 10)(instruction, weights)

    fed.start_site("site-a", fails_to_evaluate)
    fed.start_site("site-b", shift_runner(1, 20))
    fed.start_site("site-c", shift_runner(2, 30))
    fed.start()
    train, evaluation = fed.finish()
    assert train.close_reason is CloseReason.ALL_ANSWERED
    assert evaluation.kind is InstructionKind.EVALUATE
    assert [r.site for r in evaluation.results] == ["site-b", "site-c"]
    (failure,) = evaluation.failures
    assert failure.site == "site-a" and "validation data missing" in failure.reason


def test_sites_not_waited_for_are_cancelled_not_timed_out(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), rounds=1, min_fraction=1.0, max_retries=0)
    release = threading.Event()

    def broken(instruction: Instruction, weights: Weights) -> SiteAnswer:
        raise RuntimeError("disk full")

    def slow(instruction: Instruction, weights: Weights) -> SiteAnswer:
        release.wait(10)
        return shift_runner(1, 20)(instruction, weights)

    fed.start_site("site-a", broken)
    fed.start_site("site-b", slow)
    fed.start_site("site-c", slow)
    fed.start()
    with pytest.raises(QuorumError) as info:
        fed.finish()
    release.set()
    (record,) = fed.aggregator.history
    kinds = {f.site: f.kind for f in record.failures}
    assert kinds == {
        "site-a": FailureKind.ERROR,
        "site-b": FailureKind.CANCELLED,
        "site-c": FailureKind.CANCELLED,
    }
    assert "e.g. site-a: RuntimeError: disk full" in str(info.value)


# ------------------------------------------------------- folding as it streams


def exact_fedavg(start: Weights, record: Any, updates: dict[str, tuple[Weights, int]]) -> Weights:
    """The model FedAvg makes from exactly ``updates`` folded by a fresh accumulator."""
    accumulator = MeanAccumulator(specs_of(start), max_sites=len(SITES))
    for site in sorted(updates):
        delta, samples = updates[site]
        accumulator.fold(site, samples, delta)
    strategy = FedAvg()
    summary = accumulator.summary(record.round, record.results)
    _, weights = strategy.aggregate(record.round, strategy.init(start), summary, record.failures)
    return weights


def b_and_c_in_round_1(runner_cls: Any) -> dict[str, tuple[Weights, int]]:
    """What :func:`answer` sends for site-b (20 samples) and site-c (30) in round 1."""
    return {
        site: (runner_cls.delta_like(model(), SITES.index(site), 1), n)
        for site, n in (("site-b", 20), ("site-c", 30))
    }


class StalledUpload:
    """site-a's round-1 upload of ``delta`` in 8-byte chunks, held after its first four
    (half of 'w' reaches the sum) until :attr:`release` is set; the chunks offered after
    that are kept in :attr:`offered_late`."""

    def __init__(self, fed: Any, delta: Weights) -> None:
        self.chunks = list(iter_chunks(delta, 8))
        self.stalled, self.release = threading.Event(), threading.Event()
        self.offered_late: list[Chunk] = []
        self.worker = fed.spawn(
            "stalled upload", lambda: send(fed.connect("site-a"), 1, delta, chunks=self._stream())
        )

    def _stream(self) -> Iterable[Chunk]:
        yield from self.chunks[:4]
        self.stalled.set()
        self.release.wait(WAIT)
        for chunk in self.chunks[4:]:
            self.offered_late.append(chunk)
            yield chunk


def test_stream_stalled_at_the_deadline_is_rolled_back_and_refused_later(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    delta = _with("w", (0, 0), 9.0)
    delta["b"][:] = 3.0
    upload = StalledUpload(fed, delta)
    slow, release = upload.worker, upload.release
    try:
        assert upload.stalled.wait(WAIT)
        answer(fed, shift_runner, "site-b", 1, 20)
        answer(fed, shift_runner, "site-c", 1, 30)
        fed.pass_deadline()  # the round closes without waiting for site-a's stream
        (record,) = fed.finish()
        assert slow.thread.is_alive()  # still blocked in the network

        assert record.close_reason is CloseReason.DEADLINE_QUORUM
        assert [(f.site, f.kind) for f in record.failures] == [("site-a", FailureKind.TIMEOUT)]
        want = exact_fedavg(model(), record, b_and_c_in_round_1(shift_runner))
        assert weights_equal(fed.aggregator.weights, want)
    finally:
        release.set()  # the network delivers the rest
    receipt = slow.join()
    assert not receipt.accepted
    assert receipt.reason == "round 1 closed while the update streamed"
    assert [c.offset for c in upload.offered_late] == [upload.chunks[4].offset]  # refused at once


def test_failure_part_way_through_a_stream_rolls_back_what_was_folded(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    seen: list[tuple[int, int]] = []

    def crash_on_third_chunk(name: str, context: dict[str, Any]) -> None:
        if context["site"] == "site-a":
            seen.append((context["tensor"], context["offset"]))
            if len(seen) == 3:
                raise FaultInjected("connection lost after three chunks")

    fed.faults.arm("upload.chunk", crash_on_third_chunk)
    broken = send(fed.connect("site-a"), 1, _with("w", (1, 1), 50.0))
    assert not broken.accepted
    assert "upload broke off: FaultInjected: connection lost after three chunks" in broken.reason
    assert seen == [(0, 0), (0, 8), (0, 16)]
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    # site-a stays asked for the round (it could send again) until the deadline
    (broke,) = [e for e in fed.log.snapshot() if isinstance(e, UploadBroke)]
    assert (broke.round, broke.site) == (1, "site-a")
    fed.pass_deadline()
    (record,) = fed.finish()

    assert record.close_reason is CloseReason.DEADLINE_QUORUM
    (failure,) = record.failures
    assert (failure.site, failure.kind) == ("site-a", FailureKind.TIMEOUT)
    assert "its last upload broke off: FaultInjected" in failure.reason
    want = exact_fedavg(model(), record, b_and_c_in_round_1(shift_runner))
    assert weights_equal(fed.aggregator.weights, want)


def test_nan_in_a_later_chunk_is_rejected_after_earlier_chunks_were_folded(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    folded: list[int] = []
    fed.faults.arm("upload.chunk", lambda name, context: folded.append(context["offset"]))
    delta = _with("w", (2, 3), np.nan)
    delta["w"][0] = 5.0  # the first chunks move the sum
    rejected = send(fed.connect("site-a"), 1, delta)
    assert not rejected.accepted and "tensor 'w' holds 1 NaN or Inf values" in rejected.reason
    assert folded == [0, 8, 16, 24, 32]  # the sixth chunk held the NaN
    fed.faults.disarm("upload.chunk")
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()
    want = exact_fedavg(model(), record, b_and_c_in_round_1(shift_runner))
    assert weights_equal(fed.aggregator.weights, want)


def try_lock(cond: threading.Condition) -> bool:
    """Whether the calling thread can take ``cond``'s lock at once (released again)."""
    if cond.acquire(blocking=False):
        cond.release()
        return True
    return False


def test_an_incomplete_stream_is_rolled_back_outside_the_aggregators_lock(
    make_federation: Any, shift_runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fed = one_round(make_federation)
    lock_held: list[bool] = []
    abort = mean_module.MeanContribution.abort

    def watched(self: Any, reason: str = "") -> None:  # a rollback may re-read GiBs
        free: list[bool] = []  # whether another thread can take the aggregator's lock now
        probe = threading.Thread(target=lambda: free.append(try_lock(fed.aggregator.board.cond)))
        probe.start()
        probe.join()
        lock_held.append(not free[0])
        abort(self, reason)

    monkeypatch.setattr(mean_module.MeanContribution, "abort", watched)
    delta = _with("w", (0, 0), 9.0)
    truncated = list(iter_chunks(delta, 8))[:-1]  # all but 'steps'
    receipt = send(fed.connect("site-a"), 1, delta, chunks=truncated)
    assert not receipt.accepted
    assert "stream ended early: tensor 'steps' has 0 of 8 bytes" in receipt.reason
    assert lock_held == [False]
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()

    assert [(f.site, f.kind) for f in record.failures] == [("site-a", FailureKind.REJECTED)]
    want = exact_fedavg(model(), record, b_and_c_in_round_1(shift_runner))
    assert weights_equal(fed.aggregator.weights, want)


def test_rollback_spools_go_to_the_aggregators_spool_dir(
    make_federation: Any,
    shift_runner: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spool_watch: SpoolWatch,
) -> None:
    monkeypatch.setattr(mean_module, "_SPOOL_BYTES", 16)  # spools roll over to files at once
    fed = make_federation(model(), rounds=1, final_evaluation=False, min_fraction=0.5)
    fed.aggregator = Aggregator(
        fed.config,
        FedAvg(),
        model(),
        clock=fed.clock,
        faults=fed.faults,
        on_event=fed.log,
        spool_dir=tmp_path,
    )
    fed.transport = InProcessTransport(fed.aggregator)
    fed.start()
    fed.log.wait_opened(1)
    delta = shift_runner.delta_like(model(), 0, 1)
    chunks = list(iter_chunks(delta, 8))
    stalled, release = threading.Event(), threading.Event()

    def stalls() -> Iterable[Chunk]:
        yield from chunks[:4]  # 32 bytes of 'w': beyond the in-memory limit
        stalled.set()
        release.wait(WAIT)
        yield from chunks[4:]

    slow = fed.spawn("slow upload", lambda: send(fed.connect("site-a"), 1, delta, chunks=stalls()))
    try:
        assert stalled.wait(WAIT)
        assert spool_watch.on_disk_in(tmp_path) == 1  # site-a's spool, while it streams
    finally:
        release.set()
    assert slow.join().accepted
    assert spool_watch.on_disk_in(tmp_path) == 0  # committed: the spool is gone
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()
    assert record.close_reason is CloseReason.ALL_ANSWERED
    assert spool_watch.all_closed() and list(tmp_path.iterdir()) == []


def test_stream_of_a_site_that_reported_a_failure_meanwhile_is_not_folded(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation)
    delta = _with("w", (1, 2), 4.0)
    chunks = list(iter_chunks(delta, 8))
    stalled, release = threading.Event(), threading.Event()

    def stalls() -> Iterable[Chunk]:
        yield from chunks[:2]
        stalled.set()
        release.wait(WAIT)
        yield from chunks[2:]

    slow = fed.spawn("slow upload", lambda: send(fed.connect("site-a"), 1, delta, chunks=stalls()))
    try:
        assert stalled.wait(WAIT)
        fed.connect("site-a").report_failure(FailureReport(1, "out of memory", attempt_id(1)))
    finally:
        release.set()
    receipt = slow.join()
    assert not receipt.accepted
    assert receipt.reason == "site 'site-a' already answered round 1"
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    (record,) = fed.finish()

    assert record.failures == (Failure("site-a", 1, FailureKind.ERROR, "out of memory"),)
    want = exact_fedavg(model(), record, b_and_c_in_round_1(shift_runner))
    assert weights_equal(fed.aggregator.weights, want)


# ---------------------------------------------------------------- silent sites


def test_a_site_silent_mid_upload_is_dropped_before_the_deadline_and_rolled_back(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation, dead_after=5.0)
    upload = StalledUpload(fed, _with("w", (0, 0), 9.0))
    slow, release = upload.worker, upload.release
    try:
        assert upload.stalled.wait(WAIT)
        answer(fed, shift_runner, "site-b", 1, 20)
        answer(fed, shift_runner, "site-c", 1, 30)
        fed.clock.advance(4.0)  # b and c keep calling; a has been silent for 4 s
        fed.connect("site-b").get_instruction(timeout=0)
        fed.connect("site-c").get_instruction(timeout=0)
        fed.clock.advance(1.5)  # a: 5.5 s of silence; the deadline is 60 s away
        (record,) = fed.finish()
    finally:
        release.set()
    assert not slow.join().accepted  # its end is refused: the site was settled

    assert record.close_reason is CloseReason.QUORUM  # not "deadline, quorum met"
    (failure,) = record.failures
    assert (failure.site, failure.kind) == ("site-a", FailureKind.DISCONNECTED)
    assert failure.reason == "no sign of life for 5.5 s (dead_after)"
    want = exact_fedavg(model(), record, b_and_c_in_round_1(shift_runner))
    assert weights_equal(fed.aggregator.weights, want)  # a's half-update rolled back


def test_a_site_never_heard_from_is_not_dropped_for_silence_only_by_the_deadline(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = one_round(make_federation, dead_after=5.0)
    answer(fed, shift_runner, "site-b", 1, 20)
    answer(fed, shift_runner, "site-c", 1, 30)
    fed.clock.advance(30.0)  # far past dead_after: site-a never called, so not "dead"
    assert fed.loop is not None and fed.loop.thread.is_alive()
    fed.pass_deadline()
    (record,) = fed.finish()
    assert record.close_reason is CloseReason.DEADLINE_QUORUM
    assert [(f.site, f.kind) for f in record.failures] == [("site-a", FailureKind.TIMEOUT)]


def test_a_retry_gives_a_site_dropped_for_silence_its_own_dead_after_to_come_back(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), rounds=1, final_evaluation=False, dead_after=5.0, max_retries=1)
    fed.start_site("site-a", shift_runner(0, 10))
    fed.start_site("site-b", shift_runner(1, 20))
    fed.start()
    fed.log.wait_opened(1)
    assert fed.connect("site-c").get_instruction(timeout=0) is not None  # heard from, then silent
    fed.clock.advance(5.5)  # attempt 1: site-c dropped, no quorum without it
    fed.log.wait_opened(1, attempt=2)
    # the retry opened at once; site-c's old silence does not drop it again at once
    late = Collaborator(fed.connect("site-c"), shift_runner(2, 30))
    outcome = late.step(timeout=0)
    assert outcome.receipt is not None and outcome.receipt.accepted  # it answers the retry
    (first, second) = fed.finish()

    assert first.close_reason is CloseReason.NO_QUORUM
    dropped = [f for f in first.failures if f.site == "site-c"]
    assert [f.kind for f in dropped] == [FailureKind.DISCONNECTED]
    assert (second.attempt, second.close_reason) == (2, CloseReason.ALL_ANSWERED)
