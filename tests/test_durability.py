"""Durable aggregator state: a stopped federation resumes where it stopped and ends
bit-identical; stale answers are refused; damaged state is found, set aside (never
written over) and the last good round used. Real SQLite files, real checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chaos import ENV, free_port
from conftest import attempt_id, make_tiny_weights
from workspaces import make_workspace

from fedloom.core.clock import FaultPoints
from fedloom.core.errors import FaultInjected, StateError
from fedloom.core.records import CLOSE_REASON_TEXT, CloseReason
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights, specs_of, weights_equal
from fedloom.deployment import launcher
from fedloom.deployment.resume import open_run
from fedloom.pki import provision
from fedloom.plan import load_plan
from fedloom.store import load_state, load_weights, save_state
from fedloom.store.runs import RunInfo, RunStore
from fedloom.strategies import FedAdam, FedAvg, Strategy
from fedloom.transport import UpdateHeader, iter_chunks

pytestmark = pytest.mark.process

SITES = ("site-a", "site-b", "site-c")


def start_sites(fed: Any, shift_runner: Any) -> None:
    for index, site in enumerate(SITES):
        fed.start_site(site, shift_runner(index, 10 * (index + 1)))


def uninterrupted(make_federation: Any, shift_runner: Any, strategy: Strategy, **cfg: Any) -> Any:
    fed = make_federation(make_tiny_weights(), strategy=strategy, **cfg)
    start_sites(fed, shift_runner)
    fed.start()
    fed.finish()
    return fed.aggregator.weights


def journaled(
    make_federation: Any,
    shift_runner: Any,
    store: RunStore,
    strategy: Strategy,
    *,
    resume: bool = False,
    **cfg: Any,
) -> Any:
    """A federation that records into ``store``'s latest run (resumed if ``resume``)."""
    run = store.latest_run()
    if run is None:
        run = store.new_run("r", store.state_dir / "runs" / "r", "hash", "{}")
    journal = store.journal(run, lambda: (0, 0), rounds=cfg.get("rounds"))
    kwargs: dict[str, Any] = {"journal": journal}
    if resume:
        kwargs["resume"] = store.resume(run, lambda: strategy.init(make_tiny_weights()))
    fed = make_federation(make_tiny_weights(), strategy=strategy, **kwargs, **cfg)
    start_sites(fed, shift_runner)
    fed.start()
    return fed


def crash_at(point: str, round: int) -> FaultPoints:
    faults = FaultPoints()

    def crash(name: str, context: dict[str, Any]) -> None:
        if context["round"] == round:
            raise FaultInjected(f"crash at {name} in round {round}")

    faults.arm(point, crash)
    return faults


def crashed(
    make_federation: Any,
    shift_runner: Any,
    state_dir: Path,
    strategy: Callable[[], Strategy],
    crash_round: int,
    **cfg: Any,
) -> Weights:
    """Run the federation uninterrupted (returns its final weights), then again with
    state in ``state_dir``, crashing between writing and renaming round
    ``crash_round``'s checkpoint."""
    want = uninterrupted(make_federation, shift_runner, strategy(), **cfg)
    store = RunStore(state_dir, faults=crash_at("state.written", crash_round))
    with pytest.raises(FaultInjected):
        journaled(make_federation, shift_runner, store, strategy(), **cfg).finish()
    store.close()
    return want


def attempts(store: RunStore, run: RunInfo) -> list[tuple[int, int, str | None, int]]:
    return store.conn.execute(
        "SELECT round, attempt, close_reason, superseded FROM attempts WHERE run = ? "
        "ORDER BY round, attempt",
        (run.key,),
    ).fetchall()


def test_a_crash_between_writing_and_renaming_the_state_resumes_bit_identical(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    """FedAdam: the server optimiser's moments are state too; lose them and the
    resumed run drifts."""
    want = uninterrupted(make_federation, shift_runner, FedAdam(), rounds=4)

    store = RunStore(tmp_path, faults=crash_at("state.written", 3))
    first = journaled(make_federation, shift_runner, store, FedAdam(), rounds=4)
    with pytest.raises(FaultInjected):
        first.finish()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.rglob("round-*")) == [
        "round-0001.safetensors",
        "round-0002.safetensors",
        "round-0003.safetensors.tmp",  # written, never renamed into place
    ]
    store.close()

    store = RunStore(tmp_path)  # a new process
    second = journaled(make_federation, shift_runner, store, FedAdam(), resume=True, rounds=4)
    second.finish()
    assert weights_equal(second.aggregator.weights, want)
    run = store.latest_run()
    assert run is not None
    assert attempts(store, run) == [
        (1, 1, "all_answered", 0),
        (2, 1, "all_answered", 0),
        (3, 1, "stopped", 0),
        (3, 2, "all_answered", 0),
        (4, 1, "all_answered", 0),
        (5, 1, "all_answered", 0),  # the final evaluation
    ]
    history = second.aggregator.history
    assert [(r.round, r.close_reason) for r in history][2:4] == [
        (3, CloseReason.STOPPED),
        (3, CloseReason.ALL_ANSWERED),
    ]


def test_an_answer_to_the_round_before_the_restart_is_refused_as_stale(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    store = RunStore(tmp_path)
    run = store.new_run("r", tmp_path / "runs" / "r", "hash", "{}")
    first = make_federation(make_tiny_weights(), journal=store.journal(run, lambda: (0, 0)))
    first.faults.arm("round.opened", lambda name, ctx: (_ for _ in ()).throw(FaultInjected("x")))
    first.start()
    with pytest.raises(FaultInjected):
        first.finish()

    resume = store.resume(run, lambda: FedAvg().init(make_tiny_weights()))
    second = make_federation(
        make_tiny_weights(), journal=store.journal(run, lambda: (0, 0)), resume=resume
    )
    second.start()
    second.log.wait_opened(1)
    delta = shift_runner.delta_like(make_tiny_weights(), 0, 1)
    conn = second.connect("site-a")
    old = conn.upload(
        UpdateHeader(1, 10, specs_of(delta), {}, attempt_id(1, 1)), iter_chunks(delta)
    )
    assert not old.accepted
    stale = "stale update: it answers attempt run/1.1, but round 1 is now attempt run/1.2"
    assert stale in old.reason
    task = conn.get_instruction(timeout=0)
    assert task is not None and task.attempt_id == attempt_id(1, 2)
    fresh = UpdateHeader(1, 10, specs_of(delta), {}, task.attempt_id)
    assert conn.upload(fresh, iter_chunks(delta)).accepted  # the site was not penalised
    start_sites(second, shift_runner)
    second.finish()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "a flipped bit": (_flip_last_byte, "do not match the SHA-256"),
    "truncation": (_truncate, "not a valid safetensors file"),
    "deletion": (Path.unlink, "cannot read"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_set_aside_and_the_last_good_round_used(
    damage: str, make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    cfg = {"rounds": 4, "final_evaluation": False}
    want = crashed(make_federation, shift_runner, tmp_path, FedAdam, 4, **cfg)
    newest = next((tmp_path / "checkpoints").rglob("round-0003.safetensors"))
    harm, symptom = DAMAGE[damage]
    harm(newest)

    store = RunStore(tmp_path)
    resumed = journaled(make_federation, shift_runner, store, FedAdam(), resume=True, **cfg)
    resumed.finish()
    notes = " ".join(store.notes)
    assert "the checkpoint of round 3 is unusable" in notes and symptom in notes, notes
    if damage != "deletion":  # the damaged file is kept beside, never written over
        (aside,) = newest.parent.glob("round-0003.safetensors.corrupt-*")
        assert aside.exists()
    assert weights_equal(resumed.aggregator.weights, want)  # round 3 ran again
    run = store.latest_run()
    assert run is not None
    rows = attempts(store, run)
    assert (3, 1, "all_answered", 1) in rows  # superseded: its checkpoint was lost
    assert (3, 2, "all_answered", 0) in rows


def test_a_damaged_database_is_moved_aside_and_rebuilt_from_the_checkpoints(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    cfg = {"rounds": 3, "final_evaluation": False}
    want = crashed(make_federation, shift_runner, tmp_path, FedAvg, 3, **cfg)
    db = tmp_path / "state.db"
    for name in ("state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)

    store = RunStore(tmp_path)
    assert "is damaged" in store.notes[0] and "moved to state.db.corrupt-" in store.notes[0]
    assert "2 checkpoint(s) found, up to round 2" in store.notes[1]
    (aside,) = tmp_path.glob("state.db.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not a database")
    run = store.latest_run()
    assert run is not None and run.status == "interrupted"
    resumed = journaled(make_federation, shift_runner, store, FedAvg(), resume=True, **cfg)
    resumed.finish()
    assert weights_equal(resumed.aggregator.weights, want)


def test_a_database_an_earlier_version_wrote_is_migrated_with_every_record_and_resumes(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    """Schema version 1 (before protocol 6) named the attempt id ``task_id`` and kept
    close reasons in words; opening it migrates it in place, nothing moved aside."""
    cfg = {"rounds": 3, "final_evaluation": False}
    want = crashed(make_federation, shift_runner, tmp_path, FedAvg, 3, **cfg)
    conn = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    rows = "SELECT round, attempt, attempt_id, close_reason FROM attempts"
    before = conn.execute(rows).fetchall()
    conn.executescript(  # back to what version 1 wrote
        "BEGIN; ALTER TABLE attempts RENAME COLUMN attempt_id TO task_id; "
        + " ".join(
            f"UPDATE attempts SET close_reason = '{text}' WHERE close_reason = '{reason.value}';"
            for reason, text in CLOSE_REASON_TEXT.items()
        )
        + " PRAGMA user_version = 1; COMMIT;"
    )
    assert ("all answered",) in conn.execute("SELECT close_reason FROM attempts").fetchall()
    conn.close()

    store = RunStore(tmp_path)
    assert store.notes == [] and not list(tmp_path.glob("state.db.corrupt-*"))
    assert store.conn.execute("PRAGMA user_version").fetchone() == (2,)
    assert store.conn.execute(rows).fetchall() == before
    assert "all_answered" in [reason for *_, reason in before]
    resumed = journaled(make_federation, shift_runner, store, FedAvg(), resume=True, **cfg)
    resumed.finish()
    assert weights_equal(resumed.aggregator.weights, want)


def test_a_rebuilt_run_whose_training_had_finished_is_not_resumed(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    store = RunStore(tmp_path)
    cfg = {"rounds": 2, "final_evaluation": False}
    journaled(make_federation, shift_runner, store, FedAvg(), **cfg).finish()
    store.close()
    (tmp_path / "state.db").write_bytes(b"garbage" * 100)
    store = RunStore(tmp_path)
    assert "up to round 2 (its training had finished)" in store.notes[1]
    run = store.latest_run()
    assert run is not None and (run.status, run.rebuilt) == ("completed", True)


def test_with_no_good_checkpoint_left_the_run_restarts_from_the_initial_model(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    cfg = {"rounds": 2, "final_evaluation": False}
    want = crashed(make_federation, shift_runner, tmp_path, FedAvg, 2, **cfg)
    (only,) = (tmp_path / "checkpoints").rglob("round-0001.safetensors")
    _flip_last_byte(only)
    store = RunStore(tmp_path)
    resumed = journaled(make_federation, shift_runner, store, FedAvg(), resume=True, **cfg)
    resumed.finish()
    assert "no good checkpoint is left: the run restarts from round 1" in store.notes
    assert weights_equal(resumed.aggregator.weights, want)


def test_resume_new_run_plan_change_and_a_second_aggregator(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    three = load_plan(ws, ["rounds=3"])
    first = open_run(ws, three, run_dir=lambda: ws / "runs" / "a")
    assert first.resume is None and first.run.name == "a"
    with pytest.raises(StateError, match="another aggregator .* is running on this workspace"):
        open_run(ws, three, run_dir=lambda: ws / "runs" / "b")
    first.close()

    with pytest.raises(StateError, match="--run-name 'other': the unfinished run 'a' would resume"):
        open_run(ws, three, run_name="other", run_dir=lambda: ws / "runs" / "other")
    again = open_run(ws, three, run_dir=lambda: pytest.fail("a resumed run has its folder"))
    assert again.run.run_id == first.run.run_id
    assert again.resume is not None and again.resume.next_round == 1
    again.close()

    four = load_plan(ws, ["rounds=4"])
    with pytest.raises(StateError, match="unfinished and was started with plan hash") as err:
        open_run(ws, four, run_dir=lambda: ws / "runs" / "b")
    assert "--new-run" in (err.value.hint or "")

    fresh = open_run(ws, four, new_run=True, run_dir=lambda: ws / "runs" / "b")
    assert fresh.resume is None and fresh.run.name == "b"
    fresh.store.mark(fresh.run, "completed")
    fresh.close()
    after = open_run(ws, four, run_dir=lambda: ws / "runs" / "c")  # the last one completed
    assert after.resume is None and after.run.name == "c"
    after.close()


def test_a_damaged_checkpoint_found_at_start_is_said_and_the_run_resumes_from_the_last_good(
    tmp_path: Path,
) -> None:
    """Real processes: the aggregator dies as round 3 opens; round 2's checkpoint is then
    damaged on disk; the restarted aggregator says so, reruns round 2 and ends
    bit-identical to the uninterrupted run."""
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = ["sites=2", "rounds=3"]
    provision(ws, ["site-01", "site-02"])
    done = subprocess.run(  # noqa: S603 - our own command
        launcher.fedloom_command("simulate", str(ws), *plan, "--run-name", "ref", "--quiet"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    port = free_port()

    def aggregator(*extra: str) -> subprocess.Popen[bytes]:
        proc, bound = launcher.start_aggregator(
            ws, plan, *extra, port=port, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert bound == port, proc.communicate(timeout=30)[0].decode()
        return proc

    first = aggregator("--run-name", "run", "--quiet", "--fault", "round.opened@3")
    sites = [
        launcher.start_collaborator(
            ws, plan, s, port, "--give-up-after", "120", env=ENV, stdout=subprocess.DEVNULL
        )
        for s in ("site-01", "site-02")
    ]
    try:
        assert first.wait(timeout=120) == -9
        (newest,) = (ws / "aggregator" / "checkpoints").rglob("round-0002.safetensors")
        _flip_last_byte(newest)
        second = aggregator("--quiet")
        out = second.communicate(timeout=300)[0].decode()
        assert second.returncode == 0, out
        for site in sites:
            assert site.wait(timeout=60) == 0
    finally:
        for proc in sites:
            if proc.poll() is None:
                proc.kill()
    said = " ".join(out.split())  # the console wraps long lines
    assert "state: the checkpoint of round 2 is unusable" in said, out
    assert "do not match the SHA-256 recorded in it" in said, out
    assert "resuming run 'run' from round 2 of 3" in said, out
    assert "the checkpoint of round 2 is unusable" in (ws / "aggregator/aggregator.log").read_text()
    final = load_weights(ws / "runs" / "run" / "final.safetensors")
    assert weights_equal(final, load_weights(ws / "runs" / "ref" / "final.safetensors"))


def test_a_run_that_ended_after_its_final_evaluation_is_not_run_again(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    """Killed after the final evaluation closed, before the run was marked completed:
    the next start marks it completed and begins a new run, instead of waiting for
    sites that have already gone home."""
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = load_plan(ws, ["rounds=2"])
    opened = open_run(ws, plan, run_dir=lambda: ws / "runs" / "done")
    journaled(make_federation, shift_runner, opened.store, FedAvg(), rounds=2).finish()
    opened.close()  # its status still says running, as after a SIGKILL

    after = open_run(ws, plan, run_dir=lambda: ws / "runs" / "next")
    assert after.resume is None and after.run.name == "next"
    final = ws / "runs" / "done" / "final.safetensors"
    assert f"run 'done' had finished (its final model is in {final}); a new run starts" in (
        after.notes
    )
    previous = after.store.conn.execute("SELECT status FROM runs WHERE name = 'done'").fetchone()
    assert previous == ("completed",)
    after.close()
    # the final model the killed process never wrote is the last round's, from its checkpoint
    (last,) = (ws / "aggregator" / "checkpoints").rglob("round-0002.safetensors")
    assert weights_equal(load_weights(final), load_state(last).weights)


def test_a_database_with_other_tables_is_moved_aside_not_used(tmp_path: Path) -> None:
    """A state.db of another layout (an older fedloom) is never written into."""
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.executescript("PRAGMA user_version=1; CREATE TABLE runs (id INTEGER PRIMARY KEY);")
    db.close()
    store = RunStore(tmp_path)
    assert "its tables are not the ones this version of fedloom writes" in store.notes[0]
    (aside,) = tmp_path.glob("state.db.corrupt-*")
    with sqlite3.connect(aside) as old:
        assert old.execute("SELECT name FROM sqlite_master").fetchall() == [("runs",)]
    old.close()
    assert store.latest_run() is None  # a fresh database, nothing to resume
    store.close()


def test_an_attempt_closed_twice_keeps_its_first_record(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    """An interrupt landing just after a round's commit records a stop for the same
    attempt: it must neither undo the finished round nor duplicate its results."""
    store = RunStore(tmp_path)
    fed = journaled(make_federation, shift_runner, store, FedAvg(), rounds=1)
    fed.finish()
    run = store.latest_run()
    assert run is not None
    (finished, *_) = fed.aggregator.history
    again = dataclasses.replace(finished, close_reason=CloseReason.STOPPED)
    store.journal(run, lambda: (0, 0)).closed(again, None)
    assert attempts(store, run)[0] == (1, 1, "all_answered", 0)
    (results,) = store.conn.execute(
        "SELECT count(*) FROM results WHERE run = ? AND round = 1", (run.key,)
    ).fetchone()
    assert results == len(SITES)
    resume = store.resume(run, lambda: pytest.fail("round 1's checkpoint is there"))
    assert resume.next_round == 2


def test_a_moved_workspace_resumes_from_its_checkpoints(
    make_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    cfg = {"rounds": 3, "final_evaluation": False}
    crashed(make_federation, shift_runner, tmp_path / "here" / "aggregator", FedAvg, 3, **cfg)
    shutil.move(tmp_path / "here", tmp_path / "there")  # restored from a backup elsewhere
    store = RunStore(tmp_path / "there" / "aggregator")
    run = store.latest_run()
    assert run is not None and run.run_dir == tmp_path / "there" / "aggregator" / "runs" / "r"
    resume = store.resume(run, lambda: pytest.fail("the checkpoints moved with it"))
    assert resume.next_round == 3 and store.notes == []  # no checkpoint "missing"


@pytest.mark.parametrize(
    "damage",
    [b"\xff" * 8, (2**63).to_bytes(8, "little"), (10**6).to_bytes(8, "little")],
    ids=["huge", "past 2**63", "past the end"],
)
def test_a_checkpoint_with_a_garbage_header_length_is_a_state_error(
    damage: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "round-0001.safetensors"
    save_state(path, StrategyState(weights=make_tiny_weights()))
    path.write_bytes(damage + path.read_bytes()[8:])
    with pytest.raises(StateError, match="not a valid safetensors file"):
        load_state(path)


def test_the_digest_covers_the_strategy_scalars(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    save_state(path, StrategyState(weights=make_tiny_weights(), scalars={"step": 2}))
    data = path.read_bytes()
    assert data.count(b'\\"step\\": 2') == 1  # JSON inside the JSON header
    path.write_bytes(data.replace(b'\\"step\\": 2', b'\\"step\\": 3'))
    with pytest.raises(StateError, match="do not match the SHA-256"):
        load_state(path)


def test_big_endian_arrays_are_written_in_safetensors_byte_order(tmp_path: Path) -> None:
    weights = {"w": np.arange(6, dtype=">f4").reshape(2, 3), "n": np.array(7, dtype=">i8")}
    save_state(tmp_path / "s.safetensors", StrategyState(weights=weights))
    back = load_state(tmp_path / "s.safetensors").weights
    assert back["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and int(back["n"]) == 7


RESULT_FIELDS = (  # what a run's summary.json says that does not depend on timing
    "status",
    "plan_name",
    "rounds",
    "sites",
    "strategy",
    "plan_hash",
    "test_accuracy",
    "test_loss",
    "mean_site_accuracy",
    "worst_site_accuracy",
    "failures",
    "close_reasons",
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the plan below (in-process: the gRPC run is
    bit-identical to it, tests/test_deploy.py): its run folder."""
    ws = make_workspace(tmp_path_factory.mktemp("reference"), "breast-cancer")
    done = subprocess.run(  # noqa: S603 - our own command
        launcher.fedloom_command(
            "simulate", str(ws), *LATE_KILL_PLAN, "--run-name", "ref", "--quiet"
        ),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return ws / "runs" / "ref"


LATE_KILL_PLAN = ("sites=2", "rounds=2", "deadline.round_seconds=300")


@pytest.mark.parametrize(
    "point",
    [
        "run.evaluated",  # the final evaluation closed; nothing of the results written
        "run.completed",  # marked completed, the sites being told it finished
    ],
)
def test_a_run_killed_after_its_final_evaluation_has_its_results_after_one_restart(
    tmp_path: Path, reference_run: Path, point: str
) -> None:
    """Real processes: the aggregator is SIGKILLed at a fault point after the final
    evaluation. After one restart the run folder has final.safetensors (byte for byte
    the uninterrupted run's), summary.json and metrics.jsonl; a summary rebuilt from
    the state is byte for byte the one the finished process wrote."""
    ws = make_workspace(tmp_path, "breast-cancer")
    provision(ws, ["site-01", "site-02"])
    port = free_port()

    def aggregator(*extra: str) -> subprocess.Popen[bytes]:
        proc, bound = launcher.start_aggregator(
            ws,
            LATE_KILL_PLAN,
            *extra,
            port=port,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert bound == port, proc.communicate(timeout=30)[0].decode()
        return proc

    first = aggregator("--run-name", "run", "--quiet", "--fault", f"{point}@3")
    sites = [
        launcher.start_collaborator(
            ws,
            LATE_KILL_PLAN,
            s,
            port,
            "--give-up-after",
            "120",
            env=ENV,
            stdout=subprocess.DEVNULL,
        )
        for s in ("site-01", "site-02")
    ]
    try:
        assert first.wait(timeout=240) == -9, first.communicate()[0].decode()
    finally:
        for proc in sites:  # they answered the final evaluation; a restart is a new run
            proc.kill()
            proc.wait()
    run_dir = ws / "runs" / "run"
    written: dict[str, bytes] = {}
    if point == "run.completed":  # written before the run was marked completed
        written = {n: (run_dir / n).read_bytes() for n in ("final.safetensors", "summary.json")}
        for name in ("final.safetensors", "summary.json", "plan.json", "accuracy.png"):
            (run_dir / name).unlink()  # as an older fedloom left it: only metrics.jsonl
    second = aggregator("--quiet")  # it listens once the state was looked at
    second.terminate()
    out = second.communicate(timeout=60)[0].decode()
    assert second.returncode == 130, out
    assert "its results were never written" in " ".join(out.split()), out

    ref = reference_run
    assert (run_dir / "final.safetensors").read_bytes() == (ref / "final.safetensors").read_bytes()
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref))
    assert {k: got[k] for k in RESULT_FIELDS} == {k: want[k] for k in RESULT_FIELDS}
    assert got["status"] == "completed" and got["test_accuracy"] is not None
    assert (run_dir / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert (run_dir / "plan.json").exists() and (run_dir / "accuracy.png").exists()
    with sqlite3.connect(ws / "aggregator" / "state.db") as db:
        status = db.execute("SELECT status FROM runs WHERE name = 'run'").fetchone()
    db.close()
    assert status == ("completed",)
    # what the restart rebuilt is what the finished process wrote, byte for byte
    assert {n: (run_dir / n).read_bytes() for n in written} == written
