"""One hostile site must not stop the federation: what it reports is checked, capped and
escaped before the aggregator uses, stores, shows or logs it (``fedloom.core.sanitize``).

The hostile site is a :class:`GrpcConnection` holding a real site certificate from
fedloom's own PKI, talking mutual TLS on loopback to a real Aggregator (on a
ManualClock); the honest sites are Collaborator threads. ``fedloom status`` reads a real
SQLite state. The end-to-end test with the aggregator and the sites as their own OS
processes is in ``test_deploy.py``'s style, at the end.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ShiftRunner, attempt_id
from hypothesis import given
from hypothesis import strategies as st
from test_deploy import (
    finish,
    kill_leftovers,
    rows_by_round,
    start_aggregator,
    start_site,
    status_of,
)
from typer.testing import CliRunner
from workspaces import make_workspace

from fedloom.cli.main import app
from fedloom.core.errors import FedloomError
from fedloom.core.records import (
    CloseReason,
    Failure,
    FailureKind,
    Instruction,
    InstructionKind,
    RoundRecord,
    SiteAnswer,
    SiteResult,
    weighted_metrics,
)
from fedloom.core.sanitize import (
    MAX_METRICS,
    MAX_REASON_CHARS,
    checked_numbers,
    printable,
    shorten,
)
from fedloom.core.state import FederationState, StrategyState
from fedloom.core.weights import Weights, specs_of
from fedloom.pki import provision, site_credentials
from fedloom.plan import Plan, load_plan, plan_hash
from fedloom.runtime.sitedata import DataSource
from fedloom.store.database import transaction
from fedloom.store.runs import RunStore
from fedloom.store.status import read_status
from fedloom.tasks.loader import load_task
from fedloom.transport import FailureReport, InProcessTransport, UpdateHeader, iter_chunks
from fedloom.transport.grpc import ClientSettings, GrpcConnection
from fedloom.transport.grpc.wire import MAX_CONTROL_BYTES, MAX_HEADER_BYTES
from fedloom.transport.messages import assemble

SITES = ("site-a", "site-b", "site-c")
SAMPLES = (10, 30, 60)
FORGED = "2026-12-04 15:40:00,000 INFO fedloom.aggregator: round 1: update from site-b accepted"
ESCAPED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


# ------------------------------------------------------------- the pure helpers


@given(st.text(), st.integers(min_value=0, max_value=300))
def test_printable_text_has_no_control_characters_fits_its_limit_and_is_stable(
    text: str, limit: int
) -> None:
    out = printable(text, limit)
    assert len(out) <= limit
    assert not any(unicodedata.category(c) in ESCAPED for c in out)
    assert printable(out, limit) == out
    if len(text) <= limit and not any(unicodedata.category(c) in ESCAPED for c in text):
        assert out == text


def test_printable_escapes_what_could_forge_a_line_or_drive_a_terminal() -> None:
    assert printable("boom\n" + FORGED) == "boom\\n" + FORGED
    assert printable("a\r\tb\x1b[31mred\x00") == "a\\r\\tb\\x1b[31mred\\x00"
    assert printable("\u202eevil\u2028next") == "\\u202eevil\\u2028next"


def test_long_text_keeps_its_beginning_and_end_and_says_how_much_was_cut() -> None:
    text = "Traceback (most recent call last):\n" + "x" * 60_000_000 + "\nMemoryError: boom"
    out = printable(text)
    assert len(out) <= MAX_REASON_CHARS
    assert out.startswith("Traceback (most recent call last):\\nxxx")
    assert out.endswith("xxx\\nMemoryError: boom")
    head, rest = out.split(" […", 1)
    count, tail = rest.split(" characters cut…] ", 1)
    # the count is of the text's own characters (an escape \\n stands for one)
    assert int(count) == len(text) - (len(head) - 1) - (len(tail) - 1)
    cut = shorten(text)
    assert len(cut) <= MAX_REASON_CHARS and cut.endswith("x\nMemoryError: boom")
    assert (
        printable("\x1b" * 5000, 100).count("\\x1b")
        == (100 - len(" […5000 characters cut…] ")) // 4
    )


def test_the_numbers_of_an_answer_are_capped_as_the_plan_says() -> None:
    numbers = checked_numbers(
        500, {"val_samples": 900.0, "loss": 0.25}, max_samples=400, training=True
    )
    assert (numbers.num_samples, numbers.claimed_samples) == (400, 500)
    assert numbers.metrics == {"val_samples": 400.0, "loss": 0.25}
    evaluation = checked_numbers(0, {}, max_samples=400, training=False)
    assert (evaluation.num_samples, evaluation.claimed_samples) == (0, 0)


def test_weighted_metrics_never_divides_by_zero_nor_averages_junk() -> None:
    # rows as an aggregator without these checks stored them: the third site's weight
    # cancels the others' and the old mean divided by zero
    rows = [
        SiteResult("site-a", 1, 10, 10, {"loss": 1.0, "val_samples": 10.0}),
        SiteResult("site-b", 1, 30, 30, {"loss": 2.0, "val_samples": 30.0, "acc": math.nan}),
        SiteResult("site-c", 1, 60, 60, {"loss": 9.0, "val_samples": -40.0}),
        SiteResult("site-d", 1, 5, 5, {"loss": "a lot", "acc": 0.5}),  # type: ignore[dict-item]
    ]
    assert weighted_metrics(rows) == {"acc": 0.5, "loss": (10 * 1.0 + 30 * 2.0) / 40}
    assert weighted_metrics(rows[2:3]) == {}


def test_an_honest_site_whose_task_breaks_a_limit_says_so_without_sending_it(
    make_federation: Any, tiny_weights: Weights
) -> None:
    fed = make_federation(tiny_weights, rounds=1, final_evaluation=False, min_fraction=0.6)

    def chatty(instruction: Instruction, weights: Weights) -> SiteAnswer:
        delta = {k: np.zeros_like(v) for k, v in weights.items()}
        return SiteAnswer(10, {f"class_{i}_recall": 0.5 for i in range(1000)}, delta)

    fed.start()
    fed.start_site("site-a", ShiftRunner(0, 10))
    fed.start_site("site-b", ShiftRunner(1, 30))
    fed.start_site("site-c", chatty)
    (record,) = fed.finish()
    (failure,) = record.failures
    assert (failure.site, failure.kind) == ("site-c", FailureKind.ERROR)
    assert failure.reason == (
        "the task's answer cannot be sent: 1000 metrics sent; an answer may carry at most "
        f"{MAX_METRICS} (report fewer, e.g. a summary of per-class metrics)"
    )
    # an error the site reported (a refused upload would read "rejected")
    assert [(e.site, e.accepted) for e in fed.log.answered(1) if e.site == "site-c"] == [
        ("site-c", False)
    ]


# ------------------------------------------------------ a hostile site over gRPC


@pytest.fixture
def one_round(make_grpc_federation: Any) -> Any:
    """One round, no final evaluation; two answers of three make it."""
    return make_grpc_federation(min_fraction=0.6, rounds=1, final_evaluation=False)


@pytest.fixture
def aggregator_records(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """Each message the aggregator has logged so far (DEBUG and above)."""
    caplog.set_level(logging.DEBUG, logger="fedloom.aggregator")

    def read() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "fedloom.aggregator"]

    return read


def start_honest(fed: Any, runner_cls: Any, sites: tuple[str, ...] = ("site-a", "site-b")) -> None:
    for site in sites:
        index = SITES.index(site)
        fed.start_site(site, runner_cls(index, SAMPLES[index]))


def hostile_upload(fed: Any, weights: Weights, num_samples: int, metrics: dict[str, float]) -> Any:
    """site-c's answer to round 1: a valid update, with the numbers given."""
    delta = {k: np.zeros_like(v) for k, v in weights.items()}
    header = UpdateHeader(1, num_samples, specs_of(delta), metrics, attempt_id(1))
    return fed.transport.connect("site-c").upload(header, iter_chunks(delta))


BAD_NUMBERS = [
    # the honest sites weigh 10 and 30: -40 made the old metric mean divide by zero
    (
        "val_samples minus the others' total",
        50,
        {"val_samples": -40.0, "loss": 0.1},
        "metric 'val_samples' must not be negative, got -40",
    ),
    (
        "a fractional count",
        50,
        {"val_samples": 2.5},
        "metric 'val_samples' must be a whole number, got 2.5",
    ),
    (
        "a metric beyond any sane bound",
        50,
        {"loss": 1e300},
        "metric 'loss' is 1e+300, beyond ±1e+30",
    ),
    ("a sample count no site has", 10**13, {}, "sample count of 10000000000000 is beyond 1e+12"),
    (
        "too many metrics",
        50,
        {f"m{i}": 0.0 for i in range(MAX_METRICS + 1)},
        f"{MAX_METRICS + 1} metrics sent; an answer may carry at most {MAX_METRICS}",
    ),
    (
        "an overlong metric name",
        50,
        {"x" * 5000: 1.0},
        "must have 1 to 100 characters (it has 5000)",
    ),
    ("a newline in a metric name", 50, {"loss\n" + FORGED: 1.0}, "metric name 'loss\\n2026-12-04"),
    (
        "a metric named like a column of metrics.jsonl",
        50,
        {"site": 1.0},
        "metric name 'site' is reserved",
    ),
]


@pytest.mark.server
@pytest.mark.parametrize("wire", ["grpc", "in-process"])
@pytest.mark.parametrize(
    ("num_samples", "metrics", "reason"),
    [pytest.param(n, m, r, id=what) for what, n, m, r in BAD_NUMBERS],
)
def test_a_bad_number_fails_the_site_with_a_clear_reason_and_the_round_goes_on(
    num_samples: int,
    metrics: dict[str, float],
    reason: str,
    wire: str,
    make_federation: Any,
    make_grpc_federation: Any,
    shift_runner: Any,
    tiny_weights: Weights,
    aggregator_records: Callable[[], list[str]],
) -> None:
    """The checks sit where an answer enters the aggregator: both transports get them."""
    config = {"min_fraction": 0.6, "rounds": 1, "final_evaluation": False}
    if wire == "grpc":
        fed = make_grpc_federation(**config)
    else:  # every message serialised as gRPC would, without the sockets
        fed = make_federation(
            tiny_weights, transport=lambda s: InProcessTransport(s, roundtrip=True), **config
        )
    fed.start()
    fed.log.wait_opened(1)
    start_honest(fed, shift_runner)
    receipt = hostile_upload(fed, tiny_weights, num_samples, metrics)
    assert not receipt.accepted
    assert reason in receipt.reason
    (record,) = fed.finish()
    assert record.close_reason is CloseReason.QUORUM
    assert [r.site for r in record.results] == ["site-a", "site-b"]
    (failure,) = record.failures
    assert (failure.site, failure.kind, failure.reason) == (
        "site-c",
        FailureKind.REJECTED,
        receipt.reason,
    )
    assert record.metrics == {"loss": (10 * 1.0 + 30 * 2.0) / 40}
    assert all("\n" not in line and len(line) < 5000 for line in aggregator_records())


@pytest.mark.server
def test_an_audit_hash_the_receipt_cannot_sign_is_refused_before_the_update_is_taken(
    one_round: Any, shift_runner: Any, tiny_weights: Weights
) -> None:
    fed = one_round
    fed.start()
    fed.log.wait_opened(1)
    start_honest(fed, shift_runner)
    delta = {k: np.zeros_like(v) for k, v in tiny_weights.items()}
    header = UpdateHeader(1, 50, specs_of(delta), {}, attempt_id(1), "ab\0\n" + FORGED)
    receipt = fed.transport.connect("site-c").upload(header, iter_chunks(delta))
    assert not receipt.accepted
    assert receipt.reason.startswith(
        "the audit hash must be a lowercase hex digest of at most 128 characters, got "
        "'ab\\x00\\n2026-12-04 15:40:00,0 […"
    )
    (record,) = fed.finish()
    assert [r.site for r in record.results] == ["site-a", "site-b"]
    assert [(f.site, f.kind) for f in record.failures] == [("site-c", FailureKind.REJECTED)]


@pytest.mark.server
def test_an_evaluation_that_cancels_the_others_weight_is_refused(
    make_grpc_federation: Any, shift_runner: Any
) -> None:
    fed = make_grpc_federation(rounds=0)  # the final evaluation only
    fed.start()
    fed.log.wait_opened(1)
    start_honest(fed, shift_runner)
    header = UpdateHeader(1, 5, (), {"val_samples": -40.0, "loss": 7.0}, attempt_id(1))
    receipt = fed.transport.connect("site-c").upload(header, [])
    assert not receipt.accepted
    assert "metric 'val_samples' must not be negative" in receipt.reason
    (evaluation,) = fed.finish()
    assert evaluation.kind is InstructionKind.EVALUATE
    assert evaluation.metrics == {"loss": (10 * 0.0 + 30 * 1.0) / 40}


@pytest.mark.server
def test_half_a_million_metric_keys_are_refused_before_they_are_decoded(
    one_round: Any, shift_runner: Any, tiny_weights: Weights
) -> None:
    fed = one_round
    fed.start()
    fed.log.wait_opened(1)
    start_honest(fed, shift_runner)
    flood = {f"metric-{i:06d}": 0.5 for i in range(500_000)}
    receipt = hostile_upload(fed, tiny_weights, 50, flood)
    assert not receipt.accepted
    assert "the upload's header is" in receipt.reason
    assert f"the aggregator takes at most {MAX_HEADER_BYTES}" in receipt.reason
    fed.pass_deadline()  # refused before its round was read: site-c is still pending
    (record,) = fed.finish()
    assert record.close_reason is CloseReason.DEADLINE_QUORUM
    assert [r.site for r in record.results] == ["site-a", "site-b"]
    assert all(len(r.metrics) <= MAX_METRICS for r in record.results)


# ---------------------------------------------- failure reasons: size, lines, staleness


@pytest.mark.server
def test_a_stale_failure_report_is_dropped_before_it_is_logged(
    one_round: Any, shift_runner: Any, aggregator_records: Callable[[], list[str]]
) -> None:
    fed = one_round
    fed.start()
    fed.log.wait_opened(1)
    hostile = fed.transport.connect("site-c")
    flood = "x" * (MAX_CONTROL_BYTES - 1000)
    for stale in (FailureReport(7, flood, attempt_id(7)), FailureReport(1, flood, "run/1.9")):
        hostile.report_failure(stale)
    assert sum(len(line) for line in aggregator_records()) < 10_000
    assert any("a stale failure report from site-c" in line for line in aggregator_records())
    start_honest(fed, shift_runner, SITES)
    (record,) = fed.finish()
    assert record.close_reason is CloseReason.ALL_ANSWERED  # site-c still answered


@pytest.mark.server
def test_a_newline_in_a_failure_reason_cannot_forge_a_log_line(
    one_round: Any, shift_runner: Any, aggregator_records: Callable[[], list[str]]
) -> None:
    fed = one_round
    fed.start()
    fed.log.wait_opened(1)
    start_honest(fed, shift_runner)
    reason = "out of memory\n" + FORGED + "\r\n\x1b[2K\x1b[1A" + FORGED
    fed.transport.connect("site-c").report_failure(FailureReport(1, reason, attempt_id(1)))
    (record,) = fed.finish()
    (failure,) = record.failures
    assert failure.kind is FailureKind.ERROR
    assert failure.reason == "out of memory\\n" + FORGED + "\\r\\n\\x1b[2K\\x1b[1A" + FORGED
    lines = aggregator_records()
    assert all("\n" not in line and "\r" not in line and "\x1b" not in line for line in lines)
    (reported,) = [line for line in lines if "site-c reports a failure" in line]
    assert reported == f"round 1: site-c reports a failure: {failure.reason}"


@pytest.mark.server
def test_a_huge_failure_reason_is_cut_or_refused_whole_never_logged_whole(
    one_round: Any, shift_runner: Any, aggregator_records: Callable[[], list[str]]
) -> None:
    fed = one_round
    fed.start()
    fed.log.wait_opened(1)
    start_honest(fed, shift_runner)
    hostile = fed.transport.connect("site-c")
    with pytest.raises(
        FedloomError,
        match=f"FailureReport is 5000016 bytes; the aggregator takes at most {MAX_CONTROL_BYTES}",
    ):
        hostile.report_failure(FailureReport(1, "y" * 5_000_000, attempt_id(1)))
    big = "Traceback (most recent call last):\n" + "z" * 900_000 + "\nMemoryError"
    hostile.report_failure(FailureReport(1, big, attempt_id(1)))
    (record,) = fed.finish()
    (failure,) = record.failures
    assert len(failure.reason) <= MAX_REASON_CHARS
    assert failure.reason.startswith("Traceback (most recent call last):\\nzzz")
    assert failure.reason.endswith("zzz\\nMemoryError")
    assert "characters cut" in failure.reason
    assert sum(len(line) for line in aggregator_records()) < 3 * MAX_REASON_CHARS


# ------------------------------------------------------ fedloom status on bad rows


PLAN = Plan(name="hostile", sites=list(SITES), rounds=2)


def test_status_shows_a_run_whose_stored_rows_a_hostile_site_poisoned(tmp_path: Path) -> None:
    """Rows stored before the aggregator checked what sites send: ``fedloom status``
    still shows the run, with the junk left out and the text made harmless."""
    state_dir = tmp_path / "ws" / "aggregator"
    state_dir.mkdir(parents=True)
    store = RunStore(state_dir)
    try:
        plan_json = json.dumps(PLAN.model_dump(mode="json"), sort_keys=True)
        run = store.new_run("poisoned", tmp_path / "ws" / "runs" / "poisoned", "hash", plan_json)
        journal = store.journal(run, lambda: (0, 0))
        forged = "[bold red]boom[/]\n" + FORGED + "\x1b[2J" + "w" * 100_000
        clean = (
            SiteResult("site-a", 1, 10, 10, {"loss": 1.0, "val_samples": 10.0}),
            SiteResult("site-b", 1, 30, 30, {"loss": 2.0, "val_samples": 30.0}),
        )
        poisoned = (*clean, SiteResult("site-c", 2, 50, 50, {"loss": 5.0, "val_samples": -40.0}))
        failure = Failure("site-c", 1, FailureKind.ERROR, forged)
        for rnd, rows, failures in ((1, clean, (failure,)), (2, poisoned, ())):
            task = Instruction(round=rnd, kind=InstructionKind.TRAIN, attempt_id=f"r/{rnd}.1")
            journal.opened(task, 1, SITES)
            record = RoundRecord(
                rnd, InstructionKind.TRAIN, SITES, rows, failures, CloseReason.QUORUM
            )
            kept = StrategyState(weights={"w": np.zeros(3, np.float32)})
            journal.closed(record, FederationState(kept))
        with transaction(store.conn):  # and a row that is not even JSON
            store.conn.execute(
                "INSERT INTO results (run, round, attempt, site, num_samples, "
                "claimed_samples, metrics) VALUES (?, 2, 1, 'site-d', 30, 30, 'not json')",
                (run.key,),
            )
    finally:
        store.close()

    status = read_status(state_dir)
    assert status["rounds"]["finished"] == 2
    (site_c,) = [s for s in status["sites"] if s["site"] == "site-c"]
    shown = site_c["last_failure"]["reason"]
    assert shown.startswith("[bold red]boom[/]\\n" + FORGED + "\\x1b[2J")
    assert len(shown) <= MAX_REASON_CHARS
    assert status["last_round"]["metrics"] == {"loss": (10 * 1.0 + 30 * 2.0) / 40}

    done = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(
        app, ["status", str(tmp_path / "ws")]
    )
    assert done.exit_code == 0, done.output
    assert "[bold red]boom[/]" in done.output  # shown as text, not as markup
    assert "\x1b" not in done.output
    assert not any(line.startswith("2026-12-04") for line in done.output.splitlines())


# ------------------------------------- real processes: the aggregator and two sites


FORGED_LINE = (
    "1999-01-01 00:00:00,000 INFO fedloom.aggregator: round 2: update from site-03 accepted"
)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) fedloom")


def next_task(conn: GrpcConnection, round: int) -> Instruction:
    """Ask for work until the aggregator hands out round ``round``."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        task = conn.get_instruction(timeout=10)
        if task is not None and task.round == round:
            return task
    pytest.fail(f"round {round} never came")


@pytest.mark.process
def test_a_hostile_site_cannot_stop_a_real_federation_nor_forge_its_log(tmp_path: Path) -> None:
    """The aggregator and two honest sites as their own OS processes; site-03 is this
    test, holding site-03's real certificate. It answers round 1 with ``val_samples``
    minus the honest sites' total (the old aggregator died of ZeroDivisionError, and
    `fedloom status` with it), sends a stale failure report of almost 1 MiB, and fails
    round 2 with a reason that carries a forged log line and 900,000 characters."""
    ws = make_workspace(tmp_path, "breast-cancer")
    overrides = ["sites=3", "rounds=2", "deadline.min_fraction=0.6", "deadline.round_seconds=300"]
    provision(ws, ["site-01", "site-02", "site-03"])
    plan = load_plan(ws, overrides)
    data = DataSource(plan, ws, load_task(ws, plan.task))
    honest_val = sum(data.site_data(s).y_val.size for s in ("site-01", "site-02"))
    aggregator, port = start_aggregator(ws, overrides, "hostile", "--dead-after", "600")
    sites = [start_site(ws, overrides, s, port) for s in ("site-01", "site-02")]
    settings = ClientSettings(
        address=f"127.0.0.1:{port}", site="site-03", plan_hash=plan_hash(plan, ws)
    )
    hostile = GrpcConnection(site_credentials(ws / "sites" / "site-03"), settings)
    try:
        hostile.open()
        first = next_task(hostile, 1)
        stream = hostile.download(1)
        model = assemble(stream.header.tensors, stream.chunks)
        delta = {k: np.zeros_like(v) for k, v in model.items()}
        metrics = {"val_samples": float(-honest_val), "global_accuracy": 1.0}
        header = UpdateHeader(1, 100, specs_of(delta), metrics, first.attempt_id)
        receipt = hostile.upload(header, iter_chunks(delta))
        assert not receipt.accepted
        assert "metric 'val_samples' must not be negative" in receipt.reason
        flood = "x" * (MAX_CONTROL_BYTES - 1000)
        hostile.report_failure(FailureReport(1, flood, first.attempt_id))  # stale: settled
        second = next_task(hostile, 2)
        reason = "out of memory\n" + FORGED_LINE + "\n" + "z" * 900_000
        hostile.report_failure(FailureReport(2, reason, second.attempt_id))
        final = next_task(hostile, 3)
        hostile.report_failure(FailureReport(3, "no data today", final.attempt_id))
        finish(aggregator, sites)
    finally:
        hostile.close()
        kill_leftovers(aggregator, *sites)

    log = (ws / "aggregator" / "aggregator.log").read_text()
    assert len(log) < 50_000, len(log)
    assert all(LOG_LINE.match(line) for line in log.splitlines()), log
    assert "xxxxxxxxxx" not in log  # the stale report was never logged
    (failed,) = [line for line in log.splitlines() if "round 2: site-03 reports a failure" in line]
    assert "out of memory\\n" + FORGED_LINE + "\\nzzz" in failed
    by_round = rows_by_round(ws / "runs" / "hostile")
    assert by_round[1]["site-03"]["status"] == "rejected"
    assert "val_samples" in by_round[1]["site-03"]["reason"]
    assert by_round[2]["site-03"]["status"] == "error"
    assert len(by_round[2]["site-03"]["reason"]) <= MAX_REASON_CHARS
    assert {by_round[r][s]["status"] for r in (1, 2, 3) for s in ("site-01", "site-02")} == {"ok"}
    status = status_of(ws)
    assert status["run"]["status"] == "completed"
    assert (status["rounds"]["finished"], status["rounds"]["planned"]) == (2, 2)
    assert 0.0 <= status["last_round"]["metrics"]["global_accuracy"] <= 1.0
    (site_03,) = [s for s in status["sites"] if s["site"] == "site-03"]
    assert site_03["failures"] == 3
