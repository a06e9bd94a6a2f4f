"""The aggregator's durable state: where a restarted aggregator picks up.

``WORKSPACE/aggregator/`` holds ``state.db`` (SQLite: runs, attempts at rounds, site
results and failures, the live snapshot) and ``checkpoints/<run>/round-NNNN.safetensors``
(the strategy state after each finished round: global weights, optimiser moments,
scalars, with a digest of its tensors). A round is finished once its checkpoint is
renamed into place *and* the database says so; anything less reruns the round.

On a restart, :meth:`RunStore.resume` marks the attempt the dead process left open as
stopped, checks the newest checkpoints newest first, moves a damaged one aside (never
over it) and falls back to the previous good round, down to the plan's initial model.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.core.clock import FaultPoints
from fedloom.core.errors import Cancelled, StateError
from fedloom.core.events import (
    Event,
    Resume,
    RoundClosed,
    RoundOpened,
    SiteAnswered,
    SiteRejoined,
    SiteWithdrew,
    UploadBroke,
)
from fedloom.core.records import (
    CloseReason,
    Instruction,
    RoundRecord,
)
from fedloom.core.state import FederationState, StrategyState
from fedloom.store.checkpoint import load_federation_state, save_federation_state
from fedloom.store.database import (
    CHECKPOINTED,
    REJOINED,
    WITHDREW,
    open_database,
    read_history,
    stored_path,
    transaction,
    withdrawn_sites,
)
from fedloom.store.rebuild import CHECKPOINTS, rebuild_from_checkpoints

log = logging.getLogger("fedloom.aggregator")

KEEP_CHECKPOINTS = 3


def ended_as(error: BaseException) -> str:
    """The status of a run that ``error`` ended early: ``cancelled`` (``fedloom
    aggregator stop --cancel``; never resumed), ``interrupted`` (Ctrl-C, SIGTERM) or
    ``failed``; the last two resume."""
    if isinstance(error, Cancelled):
        return "cancelled"
    return "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"


@dataclass(frozen=True)
class RunInfo:
    """One run of the federation in the state database."""

    key: int  # the row's id
    run_id: str
    name: str
    run_dir: Path
    plan_hash: str
    status: str
    elapsed: float
    bytes_sent: int
    bytes_received: int
    rebuilt: bool = False  # rebuilt from its checkpoints: its per-site records were lost


class RunStore:
    """The state folder of one aggregator; one process at a time (see :func:`lock`)."""

    def __init__(
        self, state_dir: Path, *, keep: int = KEEP_CHECKPOINTS, faults: FaultPoints | None = None
    ) -> None:
        self.state_dir = state_dir
        self.workspace = state_dir.parent  # run folders are recorded relative to it
        self.keep = max(1, keep)
        self.faults = faults or FaultPoints()
        self._lock = threading.Lock()
        state_dir.mkdir(parents=True, exist_ok=True)
        self.conn, self.notes = open_database(state_dir)
        if self.notes:  # the database was damaged: what the checkpoints say is rebuilt
            with self._lock:
                self.notes += rebuild_from_checkpoints(self.conn, state_dir)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # ------------------------------------------------------------------ runs

    def latest_run(self) -> RunInfo | None:
        with self._lock:
            row = self.conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY id DESC").fetchone()
        return None if row is None else _run_info(row, self.workspace)

    def reload(self, run: RunInfo) -> RunInfo:
        with self._lock:
            row = self.conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run.key,)
            ).fetchone()
        return _run_info(row, self.workspace)

    def plan_json(self, run: RunInfo) -> str:
        """The validated plan ``run`` was started with, as canonical JSON."""
        with self._lock:
            row = self.conn.execute(
                "SELECT plan_json FROM runs WHERE id = ?", (run.key,)
            ).fetchone()
        return str(row[0]) if row is not None and row[0] is not None else ""

    def new_run(self, name: str, run_dir: Path, plan_hash: str, plan_json: str) -> RunInfo:
        run_id = secrets.token_hex(3)
        with self._lock, transaction(self.conn):
            self.conn.execute(
                "INSERT INTO runs (run_id, name, run_dir, plan_hash, plan_json, started, status)"
                " VALUES (?, ?, ?, ?, ?, ?, 'running')",
                (
                    run_id,
                    name,
                    stored_path(run_dir, self.workspace),
                    plan_hash,
                    plan_json,
                    time.time(),
                ),
            )
        run = self.latest_run()
        assert run is not None  # noqa: S101 - just inserted
        return run

    def mark(self, run: RunInfo, status: str, error: str | None = None) -> None:
        """Set the run's status: running, completed, failed, interrupted, cancelled."""
        ended = None if status == "running" else time.time()
        with self._lock, transaction(self.conn):
            self.conn.execute(
                "UPDATE runs SET status = ?, ended = ?, error = ? WHERE id = ?",
                (status, ended, error, run.key),
            )

    def forget_unopened(self, run: RunInfo) -> bool:
        """Remove ``run`` if it never opened a round (its start failed before round 1:
        a port taken, a task that does not load), so that the next start does not offer
        to resume it; True if it was removed. A run that opened one stays."""
        with self._lock, transaction(self.conn):
            (opened,) = self.conn.execute(
                "SELECT count(*) FROM attempts WHERE run = ?", (run.key,)
            ).fetchone()
            if opened:
                return False
            for table in ("events", "live"):
                self.conn.execute(f"DELETE FROM {table} WHERE run = ?", (run.key,))  # noqa: S608
            self.conn.execute("DELETE FROM runs WHERE id = ?", (run.key,))
        return True

    def write_live(
        self, run: RunInfo, snapshot: dict[str, Any], events: Iterable[EventRow] = ()
    ) -> None:
        """Publish the running aggregator's live state for ``fedloom status``, with the
        events since the last call."""
        with self._lock, transaction(self.conn):
            self.conn.execute(
                "INSERT OR REPLACE INTO live (run, updated, pid, snapshot) VALUES (?, ?, ?, ?)",
                (run.key, time.time(), os.getpid(), json.dumps(snapshot)),
            )
            self.conn.executemany(
                "INSERT INTO events (run, at, kind, round, site, detail) VALUES (?, ?, ?, ?, ?, ?)",
                [(run.key, *row) for row in events],
            )

    # ---------------------------------------------------------------- resume

    def resume(self, run: RunInfo, initial: Callable[[], StrategyState]) -> Resume:
        """Where ``run`` picks up: the newest good checkpoint (or ``initial()``, the
        plan's initial model, if none is left), the history before it, and the attempts
        each round already had. Notes on what was found go to :attr:`notes`."""
        with self._lock, transaction(self.conn):
            stopped = self.conn.execute(
                "UPDATE attempts SET closed = ?, close_reason = ? WHERE run = ? AND closed IS NULL",
                (time.time(), CloseReason.STOPPED.value, run.key),
            ).rowcount
        if stopped:
            self.notes.append(
                f"{stopped} round attempt(s) were open when the aggregator stopped: "
                "recorded as stopped; the round reruns"
            )
        state, done = None, 0
        rows = self.conn.execute(
            f"SELECT round, attempt, checkpoint FROM attempts WHERE run = ? AND {CHECKPOINTED} "
            "ORDER BY round DESC",
            (run.key,),
        ).fetchall()
        for rnd, attempt, checkpoint in rows:
            path = self.state_dir / checkpoint  # relative: the workspace may have moved
            try:
                state = load_federation_state(path)
            except StateError as err:
                _refuse_unless_damage(path, err)
                self._supersede(run, rnd, attempt, path, err)
                continue
            done = rnd
            break
        if rows and done == 0:
            self.notes.append("no good checkpoint is left: the run restarts from round 1")
        with self._lock, transaction(self.conn):  # rounds after the one kept rerun
            self.conn.execute(
                "UPDATE attempts SET superseded = 1 "
                f"WHERE run = ? AND round > ? AND {CHECKPOINTED}",
                (run.key, done),
            )
        attempts = dict(
            self.conn.execute(
                "SELECT round, max(attempt) FROM attempts WHERE run = ? GROUP BY round",
                (run.key,),
            ).fetchall()
        )
        return Resume(
            state=state if state is not None else FederationState(initial()),
            next_round=done + 1,
            history=tuple(self.history(run)),
            attempts=attempts,
            # a restarted aggregator still does not wait for the sites that withdrew
            withdrawn=withdrawn_sites(self.conn, run.key),
        )

    def _supersede(self, run: RunInfo, rnd: int, attempt: int, path: Path, err: StateError) -> None:
        where = "is missing"
        if path.exists():
            aside = path.with_name(f"{path.name}.corrupt-{_stamp()}")
            path.replace(aside)
            where = f"was moved to {aside.name}"
        self.notes.append(f"the checkpoint of round {rnd} is unusable ({err.message}); it {where}")
        with self._lock, transaction(self.conn):
            self.conn.execute(
                "UPDATE attempts SET superseded = 1 WHERE run = ? AND round = ? AND attempt = ?",
                (run.key, rnd, attempt),
            )

    def history(self, run: RunInfo) -> list[RoundRecord]:
        """Every recorded attempt of the run that still counts, in order."""
        with self._lock:
            return read_history(self.conn, run.key)

    # --------------------------------------------------------------- journal

    def journal(
        self, run: RunInfo, traffic: Callable[[], tuple[int, int]], *, rounds: int | None = None
    ) -> RunJournal:
        """The journal of ``run``; ``rounds`` (the plan's) goes into each checkpoint, so a
        run rebuilt from its checkpoints knows whether its training had finished."""
        return RunJournal(self, run, traffic, rounds)

    def _checkpoint_path(self, run: RunInfo, rnd: int) -> Path:
        return self.state_dir / CHECKPOINTS / run.run_id / f"round-{rnd:04d}.safetensors"

    def _prune(self, run: RunInfo) -> None:
        """Delete checkpoints beyond the newest ``keep`` finished rounds. A failure here
        is logged, never raised: the round it follows is finished."""
        try:
            with self._lock:
                old = self.conn.execute(
                    f"SELECT checkpoint FROM attempts WHERE run = ? AND {CHECKPOINTED} "
                    "ORDER BY round DESC LIMIT -1 OFFSET ?",
                    (run.key, self.keep),
                ).fetchall()
            for (checkpoint,) in old:
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / checkpoint).unlink()
        except Exception as err:  # noqa: BLE001 - old checkpoints stay; the next prune retries
            log.warning("could not delete old checkpoints: %s", err)


class RunJournal:
    """The round loop's :class:`~fedloom.core.events.Journal` for one run."""

    def __init__(
        self,
        store: RunStore,
        run: RunInfo,
        traffic: Callable[[], tuple[int, int]],
        rounds: int | None = None,
    ) -> None:
        self.store = store
        self.run = run
        self._rounds = rounds
        self._traffic = traffic  # (sent, received) by this process so far
        self._started = time.perf_counter()
        self._base = (run.elapsed, run.bytes_sent, run.bytes_received)

    def opened(self, task: Instruction, attempt: int, selected: tuple[str, ...]) -> None:
        s = self.store
        with s._lock, transaction(s.conn):
            s.conn.execute(
                "INSERT INTO attempts (run, round, attempt, kind, attempt_id, selected, opened) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    self.run.key,
                    task.round,
                    attempt,
                    task.kind.value,
                    task.attempt_id,
                    json.dumps(list(selected)),
                    time.time(),
                ),
            )

    def closed(self, record: RoundRecord, state: FederationState | None) -> None:
        s = self.store
        checkpoint = None
        if state is not None:
            path = s._checkpoint_path(self.run, record.round)
            save_federation_state(
                path,
                state,
                metadata={
                    "fedloom.round": str(record.round),
                    "fedloom.run": self.run.run_id,
                    "fedloom.run_name": self.run.name,
                    "fedloom.run_dir": stored_path(self.run.run_dir, s.workspace),
                    "fedloom.plan_hash": self.run.plan_hash,
                    **({} if self._rounds is None else {"fedloom.rounds": str(self._rounds)}),
                },
                before_rename=lambda tmp: s.faults.hit("state.written", round=record.round),
            )
            checkpoint = stored_path(path, s.state_dir)
        sent, received = self._traffic()
        elapsed = self._base[0] + time.perf_counter() - self._started
        with s._lock, transaction(s.conn):
            key = (self.run.key, record.round, record.attempt)
            closing = s.conn.execute(
                "UPDATE attempts SET closed = ?, close_reason = ?, checkpoint = ? "
                "WHERE run = ? AND round = ? AND attempt = ? AND closed IS NULL",
                (time.time(), record.close_reason.value, checkpoint, *key),
            )
            if closing.rowcount != 1:
                return  # closed already (an interrupt after the commit): nothing changes
            s.conn.executemany(
                "INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (*key, r.site, r.num_samples, r.claimed_samples, json.dumps(dict(r.metrics)))
                    for r in record.results
                ],
            )
            s.conn.executemany(
                "INSERT INTO failures VALUES (?, ?, ?, ?, ?, ?)",
                [(*key, f.site, f.kind.value, f.reason) for f in record.failures],
            )
            s.conn.execute(
                "UPDATE runs SET elapsed = ?, bytes_sent = ?, bytes_received = ? WHERE id = ?",
                (elapsed, self._base[1] + sent, self._base[2] + received, self.run.key),
            )
        if checkpoint is not None:
            s._prune(self.run)


EventRow = tuple[float, str, int | None, str | None, str]  # at, kind, round, site, detail


def event_row(event: Event) -> EventRow:
    """What the events table keeps of one of the round loop's events."""
    now = time.time()
    if isinstance(event, RoundOpened):
        return (now, "round opened", event.round, None, f"{len(event.selected)} sites asked")
    if isinstance(event, SiteAnswered):
        kind = "answered" if event.accepted else "failed"
        return (now, kind, event.round, event.site, event.reason)
    if isinstance(event, RoundClosed):
        r = event.record
        return (now, "round closed", r.round, None, f"attempt {r.attempt}: {r.close_reason.text}")
    if isinstance(event, UploadBroke):
        return (now, "upload broke off", event.round, event.site, event.reason)
    if isinstance(event, SiteWithdrew):
        return (now, WITHDREW, None, event.site, event.reason)
    if isinstance(event, SiteRejoined):
        return (now, REJOINED, None, event.site, "said Hello again after it withdrew")
    return (now, "joined", None, event.site, "first call since the aggregator started")


_RUN_COLUMNS = (
    "id, run_id, name, run_dir, plan_hash, status, elapsed, bytes_sent, bytes_received, rebuilt"
)


def _refuse_unless_damage(path: Path, err: StateError) -> None:
    """A checkpoint that cannot be read for another reason than being missing or
    damaged (no permission, an I/O error) is not set aside: the start is refused."""
    cause = err.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
        raise StateError(
            f"cannot read the checkpoint {path}: {cause.strerror or cause}",
            hint="fix the file's permissions or the disk, then start the aggregator again",
        ) from cause


def _run_info(row: Iterable[Any], workspace: Path) -> RunInfo:
    key, run_id, name, run_dir, plan_hash, status, elapsed, sent, received, rebuilt = row
    return RunInfo(
        key,
        run_id,
        name,
        workspace / run_dir,
        plan_hash,
        status,
        float(elapsed),
        sent,
        received,
        bool(rebuilt),
    )


def _stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")
