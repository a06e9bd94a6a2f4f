"""``fedloom status``: the aggregator's state read back, stopped or running.

The state is made by fedloom's own store (a real SQLite file, real checkpoints), and
for a running aggregator by a real Aggregator recording through its journal, with this
test process holding the workspace's lock as an aggregator would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EventLog, ShiftRunner, Worker, federation_config, make_tiny_weights
from typer.testing import CliRunner
from workspaces import heavy_imports, imported_modules

from fedloom.aggregator import Aggregator
from fedloom.cli.main import app
from fedloom.collaborator import Collaborator
from fedloom.core.clock import ManualClock
from fedloom.core.errors import StateError, TaskError
from fedloom.core.events import RoundClosed
from fedloom.core.records import (
    CloseReason,
    Failure,
    FailureKind,
    Instruction,
    InstructionKind,
    RoundRecord,
    SiteAnswer,
    SiteResult,
    finished_rounds,
)
from fedloom.core.state import FederationState, StrategyState
from fedloom.core.weights import Weights
from fedloom.plan import Plan
from fedloom.report import RunRecorder
from fedloom.store.database import transaction
from fedloom.store.locks import lock_state, running_pid
from fedloom.store.runs import RunInfo, RunJournal, RunStore
from fedloom.store.status import read_status
from fedloom.strategies import FedAvg
from fedloom.transport import InProcessTransport

SITES = ("site-a", "site-b", "site-c")
PLAN = Plan(name="status-test", sites=list(SITES), rounds=3)
TRAIN = InstructionKind.TRAIN


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "ws" / "aggregator").mkdir(parents=True)
    return tmp_path / "ws"


@pytest.fixture
def store(workspace: Path) -> Iterator[RunStore]:
    store = RunStore(workspace / "aggregator")
    yield store
    store.close()


def new_run(store: RunStore, name: str = "run-1", plan_json: str | None = None) -> RunInfo:
    if plan_json is None:
        plan_json = json.dumps(PLAN.model_dump(mode="json"), sort_keys=True)
    return store.new_run(name, store.state_dir.parent / "runs" / name, "hash", plan_json)


def state(value: float) -> StrategyState:
    return StrategyState(weights={"w": np.full(3, value, dtype=np.float32)})


def attempt(
    journal: RunJournal,
    rnd: int,
    n: int,
    reason: CloseReason,
    results: tuple[SiteResult, ...] = (),
    failures: tuple[Failure, ...] = (),
    finished: StrategyState | None = None,
) -> None:
    """Open and close attempt ``n`` at round ``rnd``, as the round loop does."""
    task = Instruction(round=rnd, kind=TRAIN, attempt_id=f"{journal.run.run_id}/{rnd}.{n}")
    journal.opened(task, n, SITES)
    record = RoundRecord(rnd, TRAIN, SITES, results, failures, reason, attempt=n)
    journal.closed(record, finished and FederationState(finished))


def result(site: str, rnd: int, n: int, **metrics: float) -> SiteResult:
    return SiteResult(site, rnd, n, n, metrics)


def record_interrupted_run(store: RunStore) -> RunInfo:
    """Three planned rounds: round 1 closes at its second attempt, round 2 with every
    site, round 3 is interrupted; a live snapshot is left behind."""
    run = new_run(store)
    journal = store.journal(run, lambda: (1000, 2000))
    timeout = "no answer before the round's deadline"
    attempt(
        journal,
        1,
        1,
        CloseReason.NO_QUORUM,
        results=(result("site-a", 1, 10, loss=1.0),),
        failures=(
            Failure("site-b", 1, FailureKind.TIMEOUT, timeout),
            Failure("site-c", 1, FailureKind.TIMEOUT, timeout),
        ),
    )
    attempt(
        journal,
        1,
        2,
        CloseReason.QUORUM,
        results=(
            result("site-a", 1, 10, loss=0.8, accuracy=0.5),
            result("site-b", 1, 30, loss=0.4, accuracy=0.9),
        ),
        failures=(Failure("site-c", 1, FailureKind.ERROR, "out of memory"),),
        finished=state(1.0),
    )
    attempt(
        journal,
        2,
        1,
        CloseReason.ALL_ANSWERED,
        results=(
            result("site-a", 2, 10, loss=0.6, accuracy=0.7, val_samples=5),
            result("site-b", 2, 30, loss=0.3, accuracy=0.8, val_samples=15),
            result("site-c", 2, 20, loss=0.2, accuracy=1.0),  # no val_samples: weight 20
        ),
        finished=state(2.0),
    )
    attempt(
        journal,
        3,
        1,
        CloseReason.STOPPED,
        results=(result("site-a", 3, 10, loss=0.1),),
        failures=(Failure("site-b", 3, FailureKind.DISCONNECTED, "stream broke off"),),
    )
    store.write_live(run, {"finished": False, "current": None, "seen_seconds_ago": {"site-a": 0}})
    store.mark(run, "interrupted", "KeyboardInterrupt")
    return run


def invoke(*args: str | Path) -> Any:
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
    return runner.invoke(app, ["status", *(str(a) for a in args)])


# ------------------------------------------------------------------ a stopped run


def test_a_stopped_run_shows_its_rounds_metrics_and_failures(
    workspace: Path, store: RunStore
) -> None:
    record_interrupted_run(store)
    status = read_status(workspace / "aggregator")

    assert status["run"]["name"] == "run-1" and status["run"]["status"] == "interrupted"
    assert status["run"]["error"] == "KeyboardInterrupt"
    assert status["aggregator"] == {"running": False, "pid": None, "serves_this_run": False}
    assert not status["stopped_without_record"] and status["resumable"]
    rounds = status["rounds"]
    assert (rounds["finished"], rounds["planned"], rounds["last_finished"]) == (2, 3, 2)
    assert (rounds["bytes_sent"], rounds["bytes_received"]) == (1000, 2000)
    assert status["live"] is None  # the snapshot left behind is not shown: nobody serves

    last = status["last_round"]
    assert (last["round"], last["attempt"], last["close_reason"]) == (2, 1, "all_answered")
    # weights: val_samples where a site reported it (5, 15), else its samples (20)
    assert last["metrics"] == {
        "accuracy": pytest.approx((5 * 0.7 + 15 * 0.8 + 20 * 1.0) / 40),
        "loss": pytest.approx((5 * 0.6 + 15 * 0.3 + 20 * 0.2) / 40),
    }

    sites = {s["site"]: s for s in status["sites"]}
    assert list(sites) == list(SITES)
    assert all(s["last_seen_seconds_ago"] is None for s in sites.values())
    assert sites["site-a"]["last_answered"] == {"round": 3, "kind": "train"}
    assert sites["site-a"]["failures"] == 0 and sites["site-a"]["last_failure"] is None
    assert sites["site-b"]["failures"] == 2
    assert sites["site-b"]["last_failure"] == {
        "round": 3,
        "attempt": 1,
        "kind": "disconnected",
        "reason": "stream broke off",
    }
    assert sites["site-c"]["failures"] == 2
    assert sites["site-c"]["last_failure"]["reason"] == "out of memory"
    assert sites["site-c"]["last_answered"] == {"round": 2, "kind": "train"}

    assert [(a["round"], a["attempt"], a["close_reason"]) for a in status["recent_attempts"]] == [
        (1, 1, "no_quorum"),
        (1, 2, "quorum"),
        (2, 1, "all_answered"),
        (3, 1, "stopped"),
    ]
    assert status["evaluation"] is None


def test_rounds_that_reran_after_a_lost_checkpoint_no_longer_count(
    workspace: Path, store: RunStore
) -> None:
    run = record_interrupted_run(store)
    (store.state_dir / "checkpoints" / run.run_id / "round-0002.safetensors").unlink()
    resume = store.resume(run, lambda: state(0.0))  # round 2 is lost: rounds 2, 3 rerun
    assert resume.next_round == 2

    status = read_status(workspace / "aggregator")
    assert (status["rounds"]["finished"], status["rounds"]["last_finished"]) == (1, 1)
    last = status["last_round"]
    assert (last["round"], last["attempt"]) == (1, 2)
    assert last["metrics"] == {
        "accuracy": pytest.approx((10 * 0.5 + 30 * 0.9) / 40),
        "loss": pytest.approx((10 * 0.8 + 30 * 0.4) / 40),
    }
    sites = {s["site"]: s for s in status["sites"]}
    assert sites["site-b"]["last_answered"] == {"round": 1, "kind": "train"}
    assert sites["site-c"]["last_answered"] is None  # it answered only round 2
    superseded = {(a["round"], a["attempt"]): a["superseded"] for a in status["recent_attempts"]}
    assert superseded[(2, 1)] and not superseded[(1, 2)]


def test_a_run_left_running_by_a_killed_aggregator_says_so(
    workspace: Path, store: RunStore
) -> None:
    run = new_run(store)
    journal = store.journal(run, lambda: (0, 0))
    journal.opened(Instruction(round=1, kind=TRAIN, attempt_id=f"{run.run_id}/1.1"), 1, SITES)
    lock_state(workspace / "aggregator").close()  # a process held it, and died

    status = read_status(workspace / "aggregator")
    assert status["run"]["status"] == "running"
    assert status["aggregator"]["running"] is False
    assert status["stopped_without_record"] and status["resumable"]
    assert status["rounds"]["finished"] == 0 and status["last_round"] is None
    (opened,) = status["recent_attempts"]
    assert (opened["round"], opened["closed"], opened["close_reason"]) == (1, None, None)

    result = invoke(workspace)
    assert result.exit_code == 0, result.output
    assert "no aggregator running" in result.stdout
    assert "stopped without recording it" in result.stdout
    assert f"fedloom aggregator start {workspace} resumes it" in result.stdout
    assert "left open (the aggregator stopped)" in result.stdout


def test_the_reader_never_waits_for_the_aggregator_writing(
    workspace: Path, store: RunStore
) -> None:
    run = new_run(store)
    with transaction(store.conn):  # the aggregator mid-write: not committed yet
        store.conn.execute("UPDATE runs SET status = 'completed' WHERE id = ?", (run.key,))
        assert read_status(workspace / "aggregator")["run"]["status"] == "running"
    assert read_status(workspace / "aggregator")["run"]["status"] == "completed"


# ------------------------------------------------------------------ a running aggregator


def failing_runner(instruction: Instruction, weights: Weights) -> SiteAnswer:
    raise TaskError("disk full")


def test_a_running_aggregator_shows_the_round_under_way(workspace: Path, store: RunStore) -> None:
    state_dir = workspace / "aggregator"
    run = new_run(store)
    lock = lock_state(state_dir)  # this process is the aggregator
    # flock locks belong to an open file: a second open, even here, sees it held
    assert running_pid(state_dir) == os.getpid()
    clock, log = ManualClock(), EventLog()
    config = federation_config(run_id=run.run_id, rounds=3, min_fraction=0.3)
    aggregator = Aggregator(
        config,
        FedAvg(),
        make_tiny_weights(),
        clock=clock,
        on_event=log,
        journal=store.journal(run, lambda: (0, 0)),
    )
    loop = Worker("aggregator run()", aggregator.run)
    try:
        log.wait_opened(1)
        transport = InProcessTransport(aggregator)
        answered = Collaborator(transport.connect("site-a"), ShiftRunner(0, 10)).step()
        failed = Collaborator(transport.connect("site-b"), failing_runner).step()
        assert answered.receipt is not None and answered.receipt.accepted
        assert failed.receipt is None and failed.failure is not None
        assert "disk full" in failed.failure and failed.instruction is not None
        clock.advance(15)
        store.write_live(run, aggregator.snapshot())

        status = read_status(state_dir)
        assert status["aggregator"] == {
            "running": True,
            "pid": os.getpid(),
            "serves_this_run": True,
        }
        assert not status["stopped_without_record"] and not status["resumable"]
        live = status["live"]
        assert live["pid"] == os.getpid() and 0 <= live["age_seconds"] < 60
        current = live["current"]
        assert (current["round"], current["kind"], current["attempt"]) == (1, "train", 1)
        assert current["attempt_id"] == f"{run.run_id}/1.1"
        assert current["selected"] == list(SITES) and current["answered"] == ["site-a"]
        assert current["failed"] == {"site-b": "disk full"}
        assert current["pending"] == ["site-c"] and current["uploading"] == {}
        assert 0 < current["seconds_left"] <= 45  # 60 s deadline, 15 s gone
        seen = {s["site"]: s["last_seen_seconds_ago"] for s in status["sites"]}
        assert seen["site-a"] == pytest.approx(15, abs=5) and seen["site-c"] is None
        out = invoke(workspace).stdout
        assert f"aggregator running (pid {os.getpid()})" in out
        assert f"now: round 1 (train, attempt 1, task {run.run_id}/1.1)" in out
        assert "answered: 1 of 3 selected sites (site-a)" in out
        assert "failed: site-b: disk full" in out and "pending: site-c" in out

        clock.advance(60)  # the deadline passes: round 1 closes with site-a's answer
        log.wait_opened(2)
        status = read_status(state_dir)
        assert status["rounds"]["finished"] == 1 and status["rounds"]["last_finished"] == 1
        last = status["last_round"]
        assert last["close_reason"] == "deadline_quorum"
        assert last["metrics"] == {"loss": 1.0}  # ShiftRunner's site 0 reports loss 1.0
        sites = {s["site"]: s for s in status["sites"]}
        assert sites["site-b"]["last_failure"]["reason"] == "disk full"
        assert sites["site-c"]["last_failure"]["kind"] == "timeout"
        assert status["recent_attempts"][-1]["closed"] is None  # round 2, open
        # the live snapshot written above is of round 1, closed since: the round under
        # way is the one the database holds open, as the finished rounds beside it say
        current = status["live"]["current"]
        assert (current["round"], current["attempt"], current["progress_published"]) == (
            2,
            1,
            False,
        )
        out = invoke(workspace).stdout
        assert "rounds: 1 of 3 finished (the last: round 1)" in out
        assert f"now: round 2 (train, attempt 1, task {run.run_id}/2.1), just opened" in out
    finally:
        for _ in range(100):  # no site answers: the rounds miss their quorum, the loop ends
            if not loop.thread.is_alive():
                break
            clock.advance(1e9)
            loop.thread.join(0.05)
        lock.close()


# ------------------------------------------------------------------ one count of rounds


def closed(rnd: int, reason: CloseReason, attempt: int = 1, kind: Any = TRAIN) -> RoundRecord:
    return RoundRecord(rnd, kind, SITES, (), (), reason, attempt=attempt)


def test_a_finished_round_is_one_aggregated_into_a_new_model() -> None:
    history = [
        closed(1, CloseReason.ALL_ANSWERED),
        closed(2, CloseReason.NO_QUORUM),  # a failed attempt: the round reruns
        closed(2, CloseReason.QUORUM, attempt=2),
        closed(3, CloseReason.STOPPED),  # the aggregator was interrupted in round 3
        closed(3, CloseReason.DEADLINE_QUORUM, attempt=2),  # resumed: round 3 again
        closed(4, CloseReason.REBUILT),  # its checkpoint survived a damaged database
        closed(5, CloseReason.ALL_ANSWERED, kind=InstructionKind.EVALUATE),  # the final one
    ]
    assert finished_rounds(history) == [1, 2, 3, 4]
    assert finished_rounds([closed(1, CloseReason.NO_QUORUM), closed(1, CloseReason.STOPPED)]) == []


def test_status_and_the_summary_of_a_resumed_then_interrupted_run_count_the_same_rounds(
    workspace: Path, store: RunStore
) -> None:
    """A failed attempt, a process that died in a round, a resume, a stop during the
    final evaluation: `fedloom status` and summary.json say one number."""
    run = new_run(store)
    journal = store.journal(run, lambda: (0, 0))
    attempt(journal, 1, 1, CloseReason.ALL_ANSWERED, finished=state(1))
    attempt(journal, 2, 1, CloseReason.NO_QUORUM)
    attempt(journal, 2, 2, CloseReason.QUORUM, finished=state(2))
    journal.opened(Instruction(round=3, kind=TRAIN, attempt_id=f"{run.run_id}/3.1"), 1, SITES)
    # the process dies in round 3; the restart records that attempt as stopped
    resume = store.resume(run, lambda: state(0))
    assert resume.next_round == 3
    recorder = RunRecorder.reopen(run.run_dir, resume.history)
    journal = store.journal(store.reload(run), lambda: (0, 0))
    for record, finished in (
        (closed(3, CloseReason.ALL_ANSWERED, attempt=2), state(3)),
        (closed(4, CloseReason.STOPPED, kind=InstructionKind.EVALUATE), None),  # Ctrl-C
    ):
        task = Instruction(round=record.round, kind=record.kind, attempt_id=f"{record.round}")
        journal.opened(task, record.attempt, SITES)
        journal.closed(record, finished and FederationState(finished))
        recorder.on_event(RoundClosed(record))
    store.mark(run, "interrupted", "KeyboardInterrupt")
    recorder.fail(PLAN, "hash", KeyboardInterrupt())

    status = read_status(workspace / "aggregator")
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert status["rounds"]["finished"] == summary["rounds_finished"] == 3
    assert status["rounds"]["last_finished"] == 3
    again = RunRecorder.reopen(run.run_dir, store.history(run))  # from the database alone
    again.fail(PLAN, "hash", KeyboardInterrupt(), history=store.history(run))
    assert json.loads((run.run_dir / "summary.json").read_text())["rounds_finished"] == 3


# ------------------------------------------------------------------ the command line


def test_the_cli_prints_tables_and_the_same_numbers_as_json(
    workspace: Path, store: RunStore
) -> None:
    record_interrupted_run(store)
    result = invoke(workspace)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "run run-1" in out and "interrupted" in out and "no aggregator running" in out
    assert "rounds: 2 of 3 finished (the last: round 2)" in out
    assert "1.0 KB sent, 2.0 KB received" in out
    assert f"{(5 * 0.7 + 15 * 0.8 + 20) / 40:.4f}" in out  # accuracy, 0.8875
    assert f"{(5 * 0.6 + 15 * 0.3 + 20 * 0.2) / 40:.4f}" in out  # loss, 0.2875
    assert "round 1.2 error: out of memory" in out and "round 3.1 disconnected" in out
    assert "stopped" in out and "Traceback" not in out

    as_json = invoke(workspace, "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == read_status(workspace / "aggregator")


@pytest.mark.process
def test_status_starts_without_importing_the_heavy_modules(
    workspace: Path, store: RunStore
) -> None:
    record_interrupted_run(store)
    modules = imported_modules("status", str(workspace))
    assert "fedloom.store.status" in modules  # it did read the state
    assert heavy_imports(modules) == []


def test_run_picks_an_earlier_run_by_name(workspace: Path, store: RunStore) -> None:
    record_interrupted_run(store)
    new_run(store, "run-2")
    assert read_status(workspace / "aggregator")["run"]["name"] == "run-2"
    earlier = read_status(workspace / "aggregator", "run-1")
    assert earlier["rounds"]["finished"] == 2
    assert not earlier["resumable"]  # only the latest run resumes
    with pytest.raises(StateError, match="no run named 'run-9'") as err:
        read_status(workspace / "aggregator", "run-9")
    assert err.value.hint is not None and "run-2, run-1" in err.value.hint

    result = invoke(workspace, "--run", "run-9")
    assert result.exit_code == StateError.exit_code and "run-9" in result.stderr


def test_a_run_rebuilt_from_checkpoints_has_no_plan(workspace: Path, store: RunStore) -> None:
    run = new_run(store, plan_json="{}")
    attempt(store.journal(run, lambda: (0, 0)), 1, 1, CloseReason.ALL_ANSWERED, finished=state(1))
    status = read_status(workspace / "aggregator")
    assert status["rounds"]["planned"] is None and status["rounds"]["finished"] == 1
    assert [s["site"] for s in status["sites"]] == list(SITES)  # those the rounds selected
    result = invoke(workspace)
    assert result.exit_code == 0, result.output
    assert "rounds: 1 of ? finished" in result.stdout


def test_a_workspace_without_aggregator_state_is_a_clear_error(tmp_path: Path) -> None:
    result = invoke(tmp_path)
    assert result.exit_code == StateError.exit_code
    assert "no aggregator state" in result.stderr and "fedloom aggregator start" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "aggregator").exists()  # nothing is created
