"""What ``fedloom status`` shows, read from the aggregator's state.

:func:`read_status` opens ``WORKSPACE/aggregator/state.db`` read-only, beside an
aggregator writing it (WAL mode) or on a stopped workspace, and returns plain JSON data:
the run, whether an aggregator holds the workspace, the finished rounds, the round under
way (from the live snapshot, only while an aggregator serves the run), every site of the
plan, and the last finished round's metrics. It never writes the database.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from fedloom.core.errors import StateError
from fedloom.core.records import (
    CloseReason,
    InstructionKind,
    RoundRecord,
    SiteResult,
    finished_rounds,
    weighted_metrics,
)
from fedloom.core.sanitize import MAX_METRICS, MAX_NAME_CHARS, printable
from fedloom.core.site_name import roster_of
from fedloom.store.database import (
    ENDED,
    closed_attempts,
    open_read_only,
    withdrawn_sites,
)
from fedloom.store.locks import running_pid

# Light on purpose: no numpy, pydantic or cryptography, so `fedloom status` starts at
# once (tests/test_cli.py checks).

RECENT_ATTEMPTS = 5

_RUN_COLUMNS = (
    "id, run_id, name, run_dir, plan_json, status, started, ended, error, elapsed, "
    "bytes_sent, bytes_received"
)
# a result or failure of an attempt that still counts (its round did not rerun)
_COUNTS = (
    "JOIN attempts a ON a.run = x.run AND a.round = x.round AND a.attempt = x.attempt "
    "WHERE x.run = ? AND a.superseded = 0"
)


def read_status(state_dir: Path, run_name: str | None = None) -> dict[str, Any]:
    """The status of the latest run in ``state_dir`` (or of the latest run named
    ``run_name``), as JSON-able data. Raises :class:`StateError` where there is no
    state, or no such run."""
    conn = open_read_only(state_dir)
    try:
        conn.execute("BEGIN")  # every table read from one snapshot of the database
        return _read(conn, state_dir, run_name, running_pid(state_dir))
    finally:
        conn.close()


def _read(
    conn: sqlite3.Connection, state_dir: Path, run_name: str | None, pid: int | None
) -> dict[str, Any]:
    (latest,) = conn.execute("SELECT max(id) FROM runs").fetchone()
    if latest is None:
        raise StateError(
            f"no run is recorded in {state_dir}",
            hint="start one with `fedloom aggregator start WORKSPACE`",
        )
    row = _pick_run(conn, state_dir, run_name)
    key, run_id, name, run_dir, plan_json, status, started, ended, error = row[:9]
    elapsed, sent, received = row[9:]
    plan = json.loads(plan_json)
    serving = pid is not None and key == latest  # an aggregator serves the latest run
    history = closed_attempts(conn, key)
    finished = finished_rounds(history)
    # the attempt that finished the last finished round
    last = next((r for r in reversed(history) if r.aggregated), None)
    live = _live(conn, key, pid) if serving else None
    seen = {} if live is None else live.pop("seen_seconds_ago")
    planned = plan.get("rounds")
    return {
        "state_dir": str(state_dir),
        "run": {
            "name": name,
            "run_id": run_id,
            "status": status,
            "run_dir": run_dir,
            "started": started,
            "ended": ended,
            "error": error,
        },
        "aggregator": {"running": pid is not None, "pid": pid, "serves_this_run": serving},
        "stopped_without_record": status == "running" and not serving,
        "resumable": key == latest and status not in ENDED and not serving,
        "rounds": {
            "finished": len(finished),
            "planned": planned if isinstance(planned, int) else None,
            "last_finished": None if last is None else last.round,
            "elapsed_seconds": float(elapsed),
            "bytes_sent": sent,
            "bytes_received": received,
        },
        "live": live,
        "sites": _sites(conn, key, plan, seen),
        "last_round": None if last is None else _closed_attempt(conn, key, last),
        "evaluation": _evaluation(conn, key, history),
        "recent_attempts": _recent(conn, key),
    }


def _pick_run(conn: sqlite3.Connection, state_dir: Path, run_name: str | None) -> tuple[Any, ...]:
    if run_name is None:
        row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY id DESC").fetchone()
    else:
        row = conn.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE name = ? ORDER BY id DESC", (run_name,)
        ).fetchone()
    if row is None:
        names = [n for (n,) in conn.execute("SELECT name FROM runs ORDER BY id DESC LIMIT 10")]
        raise StateError(
            f"no run named {run_name!r} in {state_dir}",
            hint=f"the latest runs recorded there: {', '.join(names)}",
        )
    return tuple(row)


def _live(conn: sqlite3.Connection, key: int, pid: int | None) -> dict[str, Any] | None:
    """The snapshot the serving aggregator published, with its age; None before its
    first one (a snapshot left by an earlier process of the run is not shown)."""
    row = conn.execute("SELECT updated, pid, snapshot FROM live WHERE run = ?", (key,)).fetchone()
    if row is None:
        return None
    updated, writer, text = row
    if pid is not None and pid > 0 and writer != pid:
        return None
    snapshot = json.loads(text)
    age = max(0.0, time.time() - updated)
    return {
        "updated": updated,
        "age_seconds": age,
        "pid": writer,
        "finished": snapshot.get("finished", False),
        "current": _current(conn, key, snapshot.get("current"), age),
        "seen_seconds_ago": {s: t + age for s, t in snapshot.get("seen_seconds_ago", {}).items()},
        "privacy": snapshot.get("privacy"),  # epsilon spent so far, under DP
    }


def _current(
    conn: sqlite3.Connection, key: int, published: dict[str, Any] | None, age: float
) -> dict[str, Any] | None:
    """The round under way: the attempt the state database holds open (the round loop
    records it before any site hears of it), so it agrees with the finished rounds read
    beside it. Its sites' progress comes from the aggregator's snapshot, written once a
    second, where that snapshot is of the same attempt; rounds can be faster than that,
    and then the progress is not published yet (``progress_published`` False)."""
    row = conn.execute(
        "SELECT round, attempt, kind, attempt_id, selected FROM attempts "
        "WHERE run = ? AND closed IS NULL ORDER BY opened DESC, round DESC, attempt DESC",
        (key,),
    ).fetchone()
    if row is None:
        return None
    rnd, attempt, kind, attempt_id, selected = row
    if published is not None and published.get("attempt_id") == attempt_id:
        return {
            **published,
            "seconds_left": max(0.0, published["seconds_left"] - age),
            "failed": {s: printable(r) for s, r in published.get("failed", {}).items()},
            "progress_published": True,
        }
    return {
        "round": rnd,
        "kind": kind,
        "attempt": attempt,
        "attempt_id": attempt_id,
        "selected": json.loads(selected),
        "answered": [],
        "failed": {},
        "pending": [],
        "uploading": {},
        "seconds_left": None,
        "progress_published": False,
    }


def _sites(
    conn: sqlite3.Connection, key: int, plan: dict[str, Any], seen: dict[str, float]
) -> list[dict[str, Any]]:
    """Every site of the plan's roster (or, for a plan not recorded, every site a round
    selected): seconds since the aggregator last heard from it (``seen``, while one
    serves the run), the last round it answered, its failures in this run, and why it
    withdrew if it did (and has not come back)."""
    answered: dict[str, dict[str, Any]] = {}
    for site, rnd, kind in conn.execute(
        f"SELECT x.site, x.round, a.kind FROM results x {_COUNTS} ORDER BY x.round, x.attempt",
        (key,),
    ):
        answered[site] = {"round": rnd, "kind": kind}
    failures: dict[str, list[dict[str, Any]]] = {}
    for site, rnd, attempt, kind, reason in conn.execute(
        f"SELECT x.site, x.round, x.attempt, x.kind, x.reason FROM failures x {_COUNTS} "
        "ORDER BY x.round, x.attempt",
        (key,),
    ):
        failures.setdefault(site, []).append(
            {"round": rnd, "attempt": attempt, "kind": kind, "reason": printable(reason)}
        )
    withdrawn = withdrawn_sites(conn, key)
    return [
        {
            "site": site,
            "last_seen_seconds_ago": seen.get(site),
            "last_answered": answered.get(site),
            "failures": len(failures.get(site, ())),
            "last_failure": failures[site][-1] if site in failures else None,
            # why it withdrew, while it has not said Hello since
            "withdrawn": printable(withdrawn[site]) if site in withdrawn else None,
        }
        for site in _roster(conn, key, plan)
    ]


def _roster(conn: sqlite3.Connection, key: int, plan: dict[str, Any]) -> list[str]:
    """The run's sites: from its plan's ``sites`` (none in the '{}' of a run rebuilt from
    its checkpoints), else every site its attempts selected."""
    named = plan.get("sites")
    if isinstance(named, int) and not isinstance(named, bool) and named > 0:
        return list(roster_of(named))
    if isinstance(named, list) and named and all(isinstance(s, str) for s in named):
        return list(roster_of(named))
    sites: set[str] = set()
    for (selected,) in conn.execute("SELECT selected FROM attempts WHERE run = ?", (key,)):
        sites.update(json.loads(selected))
    return sorted(sites)


def _closed_attempt(conn: sqlite3.Connection, key: int, record: RoundRecord) -> dict[str, Any]:
    """How one attempt closed, and the sample-weighted mean of its sites' metrics."""
    rnd, attempt = record.round, record.attempt
    results = [
        SiteResult(site, rnd, n, claimed, _stored_metrics(metrics))
        for site, n, claimed, metrics in conn.execute(
            "SELECT site, num_samples, claimed_samples, metrics FROM results "
            "WHERE run = ? AND round = ? AND attempt = ?",
            (key, rnd, attempt),
        )
    ]
    means = weighted_metrics(results)
    shown = dict(list(means.items())[:MAX_METRICS])
    return {
        "round": rnd,
        "attempt": attempt,
        "close_reason": record.close_reason.value,
        "sites_answered": len(results),
        "metrics": {printable(k, MAX_NAME_CHARS): v for k, v in shown.items()},
        "metrics_not_shown": len(means) - len(shown),
    }


def _stored_metrics(text: Any) -> dict[str, Any]:
    """A result row's metrics. A row the aggregator stored before it checked what sites
    report (:mod:`fedloom.core.sanitize`) may hold anything: what is not a JSON object counts
    as no metrics; :func:`weighted_metrics` leaves out what is not a finite number."""
    try:
        metrics = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _evaluation(
    conn: sqlite3.Connection, key: int, history: list[RoundRecord]
) -> dict[str, Any] | None:
    """The final evaluation's latest closed attempt, if the run got that far."""
    last = next(
        (
            r
            for r in reversed(history)
            if r.kind is InstructionKind.EVALUATE and r.close_reason is not CloseReason.REBUILT
        ),
        None,
    )
    return None if last is None else _closed_attempt(conn, key, last)


def _recent(conn: sqlite3.Connection, key: int) -> list[dict[str, Any]]:
    """The last few attempts, oldest first; ``closed`` None: still open, or left open
    by a process that died (a restart records it as stopped)."""
    rows = conn.execute(
        "SELECT round, attempt, kind, opened, closed, close_reason, superseded FROM attempts "
        "WHERE run = ? ORDER BY opened DESC, round DESC, attempt DESC LIMIT ?",
        (key, RECENT_ATTEMPTS),
    ).fetchall()
    return [
        {
            "round": rnd,
            "attempt": attempt,
            "kind": kind,
            "opened": opened,
            "closed": closed,
            "close_reason": reason,
            "superseded": bool(superseded),
        }
        for rnd, attempt, kind, opened, closed, reason, superseded in reversed(rows)
    ]
