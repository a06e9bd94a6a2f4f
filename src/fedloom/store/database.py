"""The aggregator's records in SQLite: runs, each attempt at each round, what every site
answered, and the live state a running aggregator publishes for ``fedloom status``.

A database that SQLite cannot read, or that fails its integrity check, is never written
over: it is moved aside (``state.db.corrupt-<time>``) and a new one is made, so what
can still be recovered from it stays on disk.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import os
import sqlite3
from pathlib import Path

from fedloom.core.errors import DiskError, StateError, disk_error
from fedloom.core.records import (
    CLOSE_REASON_TEXT,
    CloseReason,
    Failure,
    FailureKind,
    InstructionKind,
    RoundRecord,
    SiteResult,
)

DB_FILE = "state.db"
SCHEMA_VERSION = 2  # 2: attempts.attempt_id (was task_id), close reasons as stable ids

# the statuses of a run that is over: never resumed (a cancelled one may have rounds left)
ENDED = frozenset({"completed", "cancelled"})
# an attempt whose checkpoint a restart may resume from: a training round aggregated
# (fedloom.core.records.finished_rounds counts them), not superseded
CHECKPOINTED = "kind = 'train' AND checkpoint IS NOT NULL AND superseded = 0"
WITHDREW = "withdrew"  # an event's kind: the site withdrew (detail: why)
REJOINED = "rejoined"  # a withdrawn site said Hello again

_SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,        -- names the run in attempt ids
    name TEXT NOT NULL,                 -- the run folder's name
    run_dir TEXT NOT NULL,
    plan_hash TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    started REAL NOT NULL,              -- unix time
    status TEXT NOT NULL,               -- running, completed, failed, interrupted, cancelled
    ended REAL,
    error TEXT,
    elapsed REAL NOT NULL DEFAULT 0,    -- seconds of rounds, over every process
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    bytes_received INTEGER NOT NULL DEFAULT 0,
    rebuilt INTEGER NOT NULL DEFAULT 0  -- 1: rebuilt from checkpoints, per-site records lost
);
CREATE TABLE attempts (
    run INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    kind TEXT NOT NULL,                 -- train, evaluate
    attempt_id TEXT NOT NULL,
    selected TEXT NOT NULL,             -- JSON list of sites
    opened REAL NOT NULL,
    closed REAL,                        -- NULL while open (or if the process died)
    close_reason TEXT,                  -- a CloseReason's stable id
    checkpoint TEXT,                    -- the state after the round, for a finished round
    superseded INTEGER NOT NULL DEFAULT 0,  -- 1: its checkpoint was lost; the round reran
    PRIMARY KEY (run, round, attempt)
);
CREATE TABLE results (
    run INTEGER NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL,
    site TEXT NOT NULL, num_samples INTEGER NOT NULL, claimed_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL
);
CREATE TABLE failures (
    run INTEGER NOT NULL, round INTEGER NOT NULL, attempt INTEGER NOT NULL,
    site TEXT NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE events (
    run INTEGER NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
    round INTEGER, site TEXT, detail TEXT NOT NULL
);
CREATE TABLE live (
    run INTEGER PRIMARY KEY, updated REAL NOT NULL, pid INTEGER NOT NULL, snapshot TEXT NOT NULL
);
CREATE INDEX results_by_round ON results (run, round, attempt);
CREATE INDEX failures_by_round ON failures (run, round, attempt);
CREATE INDEX events_by_run ON events (run, at);
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection for the aggregator (one, shared by its threads under a lock)."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a finished round survives a power cut
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def open_database(state_dir: Path) -> tuple[sqlite3.Connection, list[str]]:
    """Open (or create) ``state_dir/state.db``; returns the connection and notes on
    what was found (a damaged database moved aside)."""
    path = state_dir / DB_FILE
    notes: list[str] = []
    try:
        if path.exists():
            problem = _check(path)
            if problem is None:
                return connect(path), notes
            aside = _move_aside(path)
            notes.append(
                f"{path} is damaged ({problem}); it was moved to {aside.name} and a new one "
                "made from the checkpoints on disk"
            )
        conn = connect(path)
        conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
    except sqlite3.Error as err:
        disk = sqlite_disk_error(err, path)
        if disk is None:
            raise
        raise disk from err
    return conn, notes


def sqlite_disk_error(err: sqlite3.Error, path: Path) -> DiskError | None:
    """SQLite's refusal to write ``path`` (a full disk, a read-only file system, a folder
    this user may not write) as a :class:`DiskError` naming it; None for anything else."""
    code = getattr(err, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
    if code == sqlite3.SQLITE_FULL:
        why: int | None = errno.ENOSPC
    elif code in (
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_PERM,
    ):
        why = _not_writable(path.parent)
    else:
        return None
    if why is None:
        return None
    return disk_error(OSError(why, os.strerror(why), str(path)))


def _not_writable(folder: Path) -> int | None:
    """Why ``folder`` cannot be written (an errno), or None if it looks writable."""
    try:
        stat = os.statvfs(folder)
    except OSError as err:
        return err.errno if err.errno in (errno.EACCES, errno.EPERM) else None
    if stat.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stat.f_bavail == 0:
        return errno.ENOSPC
    if not os.access(folder, os.W_OK):
        return errno.EACCES
    return None


def open_read_only(state_dir: Path) -> sqlite3.Connection:
    """A read-only connection, for ``fedloom status`` beside a running aggregator."""
    path = state_dir / DB_FILE
    if not path.exists():
        raise StateError(
            f"no aggregator state in {state_dir}",
            hint="the federation has not been started here with `fedloom aggregator start`",
        )
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.execute("SELECT count(*) FROM runs").fetchone()
    except sqlite3.DatabaseError as err:
        raise StateError(
            f"{path} cannot be read: {err}",
            hint="start the aggregator: it moves a damaged database aside and recovers "
            "from the checkpoints",
        ) from err
    return conn


class transaction:  # noqa: N801 - used like a function: with transaction(conn): ...
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK`` on an error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        if self.conn.in_transaction:  # one an interrupt left half-begun
            self.conn.execute("ROLLBACK")
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if kind is not None:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if isinstance(value, sqlite3.Error):
                self._raise_disk_error(value)
            return
        try:
            self.conn.execute("COMMIT")
        except BaseException as err:
            if self.conn.in_transaction:  # a full disk: leave the connection usable
                self.conn.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error):
                self._raise_disk_error(err)
            raise

    def _raise_disk_error(self, err: sqlite3.Error) -> None:
        """A write the disk refused becomes a :class:`DiskError` naming the database."""
        try:
            row = self.conn.execute("PRAGMA database_list").fetchone()
        except sqlite3.Error:
            return
        if row is None or not row[2]:
            return
        disk = sqlite_disk_error(err, Path(row[2]))
        if disk is not None:
            raise disk from err


_DAMAGE = ("not a database", "malformed", "corrupt", "no such table", "no such column")


def _check(path: Path) -> str | None:
    """Why the database is damaged (it is then set aside), or None; one an earlier
    version of fedloom wrote is brought to this version first. An error that
    says nothing of its contents (the disk, permissions, a lock) refuses the start
    instead: a transient problem must not cost the records."""
    try:
        conn = sqlite3.connect(path, timeout=30)
        try:
            (result,) = conn.execute("PRAGMA quick_check").fetchone()
            if result != "ok":
                return f"integrity check: {result}"
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == 1:
                _migrate_from_1(conn)
                version = SCHEMA_VERSION
            if version != SCHEMA_VERSION:
                return f"schema version {version}, expected {SCHEMA_VERSION}"
            if _columns(conn) != _expected_columns():
                return "its tables are not the ones this version of fedloom writes"
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        if any(word in str(err).lower() for word in _DAMAGE):
            return str(err)
        raise StateError(
            f"cannot open {path}: {err}",
            hint="check the disk and the file's permissions, then start again",
        ) from err
    return None


def _migrate_from_1(conn: sqlite3.Connection) -> None:
    """Bring a version-1 database (fedloom before protocol 6) to this version, keeping
    every record: its attempts named the attempt id ``task_id`` and stored close reasons
    as their words. One transaction: a crash leaves it as it was."""
    if "task_id" not in _columns(conn).get("attempts", []):
        return  # not the layout version 1 wrote: the column check that follows says so
    steps = [
        "ALTER TABLE attempts RENAME COLUMN task_id TO attempt_id;",
        *(
            f"UPDATE attempts SET close_reason = '{reason.value}' "  # noqa: S608 - our constants
            f"WHERE close_reason = '{text}';"
            for reason, text in CLOSE_REASON_TEXT.items()
        ),
        f"PRAGMA user_version = {SCHEMA_VERSION};",
    ]
    conn.isolation_level = None
    conn.executescript("BEGIN; " + " ".join(steps) + " COMMIT;")


def _columns(conn: sqlite3.Connection) -> dict[str, list[str]]:
    tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {
        t: [row[1] for row in conn.execute(f"PRAGMA table_info({t})")]  # noqa: S608 - names from the schema
        for t in sorted(tables)
    }


def _expected_columns() -> dict[str, list[str]]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        return _columns(conn)
    finally:
        conn.close()


def _move_aside(path: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):  # SQLite's companions go with it
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.replace(aside.with_name(aside.name + suffix))
    path.replace(aside)
    return aside


def withdrawn_sites(conn: sqlite3.Connection, run_key: int) -> dict[str, str]:
    """The sites of the run whose last word was a withdrawal, and why (from its events;
    a withdrawal in the last second before the aggregator was killed may be lost)."""
    out: dict[str, str] = {}
    for kind, site, detail in conn.execute(
        "SELECT kind, site, detail FROM events WHERE run = ? AND kind IN (?, ?) ORDER BY at, rowid",
        (run_key, WITHDREW, REJOINED),
    ):
        if kind == WITHDREW:
            out[site] = detail
        else:
            out.pop(site, None)
    return out


def closed_attempts(conn: sqlite3.Connection, run_key: int) -> list[RoundRecord]:
    """Every closed attempt of the run that still counts (not superseded), in order:
    what :func:`~fedloom.core.records.finished_rounds` counts, for a resumed run and
    for ``fedloom status`` alike. The records hold no per-site results or failures
    (:func:`read_history` adds them). An attempt rebuilt from its
    checkpoint, whose close reason was lost with the database, closed as
    :attr:`~fedloom.core.records.CloseReason.REBUILT`."""
    return [
        RoundRecord(
            round=rnd,
            kind=InstructionKind(kind),
            selected=tuple(json.loads(selected)),
            results=(),
            failures=(),
            close_reason=CloseReason.REBUILT if reason is None else CloseReason(reason),
            attempt=attempt,
        )
        for rnd, attempt, kind, selected, reason in conn.execute(
            "SELECT round, attempt, kind, selected, close_reason FROM attempts WHERE run = ? "
            "AND superseded = 0 AND closed IS NOT NULL ORDER BY round, attempt",
            (run_key,),
        )
    ]


def read_history(conn: sqlite3.Connection, run_key: int) -> list[RoundRecord]:
    """:func:`closed_attempts`, each with its sites' results and failures."""
    results: dict[tuple[int, int], list[SiteResult]] = {}
    for rnd, attempt, site, n, claimed, metrics in conn.execute(
        "SELECT round, attempt, site, num_samples, claimed_samples, metrics FROM results "
        "WHERE run = ? ORDER BY site",
        (run_key,),
    ):
        results.setdefault((rnd, attempt), []).append(
            SiteResult(site, rnd, n, claimed, json.loads(metrics))
        )
    failures: dict[tuple[int, int], list[Failure]] = {}
    for rnd, attempt, site, kind, reason in conn.execute(
        "SELECT round, attempt, site, kind, reason FROM failures WHERE run = ? ORDER BY site",
        (run_key,),
    ):
        failures.setdefault((rnd, attempt), []).append(
            Failure(site, rnd, FailureKind(kind), reason)
        )
    return [
        dataclasses.replace(
            r,
            results=tuple(results.get((r.round, r.attempt), ())),
            failures=tuple(failures.get((r.round, r.attempt), ())),
        )
        for r in closed_attempts(conn, run_key)
    ]


def stored_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` where it lies inside it (the state survives the
    workspace being moved or restored elsewhere), else absolute."""
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())
