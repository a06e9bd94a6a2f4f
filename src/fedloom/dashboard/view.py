"""What the dashboard shows, as JSON: the aggregator's state, read without writing it.

:func:`dashboard_view` reads ``WORKSPACE/aggregator/state.db`` through
:func:`fedloom.store.status.read_status` (read-only, safe beside a running aggregator)
and the run folder's ``metrics.jsonl`` (the curves, as :func:`fedloom.html_report.round_curves`
draws them for ``fedloom report``), and shapes them for the page: the run, the round
counter, the round under way, one status per site, the curves, the privacy spent and the
bytes moved. A workspace with no state yet, or no run, is a message on the page, never
an error of the server.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedloom.core.errors import FedloomError
from fedloom.html_report import round_curves
from fedloom.store.status import read_status


class SiteStatus(StrEnum):
    """What a site is doing, as the dashboard's sites table shows it."""

    ANSWERED = "answered"  # its answer to the round under way was accepted
    PENDING = "pending"  # selected for the round under way, not answered yet
    UPLOADING = "uploading"  # its update is streaming in
    FAILED = "failed"  # it failed the round under way (the reason is shown)
    WITHDRAWN = "withdrawn"  # it withdrew, and has not said Hello since
    IDLE = "idle"  # not in a round now: between rounds, not selected, or the run is over


def site_status(site: str, current: Mapping[str, Any] | None, withdrawn: bool) -> SiteStatus:
    """``site``'s status in the round under way (``current``, as
    :func:`~fedloom.store.status.read_status` gives it in ``live``)."""
    if withdrawn:
        return SiteStatus.WITHDRAWN
    if current is None:
        return SiteStatus.IDLE
    if current.get("progress_published", True):
        if site in current.get("failed", {}):
            return SiteStatus.FAILED
        if site in current.get("uploading", {}):
            return SiteStatus.UPLOADING
        if site in current.get("answered", ()):
            return SiteStatus.ANSWERED
        if site in current.get("pending", ()):
            return SiteStatus.PENDING
    elif site in current.get("selected", ()):
        return SiteStatus.PENDING  # the round just opened: nobody has answered yet
    return SiteStatus.IDLE


def dashboard_view(state_dir: Path, run_name: str | None = None) -> dict[str, Any]:
    """The dashboard's data for the latest run in ``state_dir`` (or the latest run named
    ``run_name``): ``{"ok": True, ...}``, or ``{"ok": False, "error": ..., "hint": ...}``
    where there is nothing to show yet. Never raises for a workspace's state."""
    try:
        status = read_status(state_dir, run_name)
    except FedloomError as err:
        return {"ok": False, "error": err.message, "hint": err.hint, "updated": time.time()}
    except sqlite3.Error as err:  # a database still being created by the aggregator
        return {
            "ok": False,
            "error": f"the aggregator's state cannot be read yet: {err}",
            "hint": "the page tries again every second",
            "updated": time.time(),
        }
    # the run folder as stored: relative to the workspace where it lies inside it
    run_dir = state_dir.parent / status["run"]["run_dir"]
    rows = read_metric_rows(run_dir / "metrics.jsonl")
    live = status["live"]
    current = None if live is None else live["current"]
    return {
        "ok": True,
        "updated": time.time(),
        "run": {k: status["run"][k] for k in ("name", "run_id", "status", "error")},
        "aggregator": {
            "running": status["aggregator"]["serves_this_run"],
            "stopped_without_record": status["stopped_without_record"],
        },
        "rounds": status["rounds"],
        "now": _now(live),
        "sites": [_site(s, current) for s in status["sites"]],
        "curves": {
            name: [[rnd, value] for rnd, value in points]
            for name, points in round_curves(rows).items()
        },
        "privacy": _privacy(live, rows),
        "last_round": status["last_round"],
        "evaluation": status["evaluation"],
    }


def read_metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` as far as they are written: a line the
    recorder is still writing (or a file not there yet) is left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
    return rows


def _now(live: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The round under way, or what the aggregator does between rounds."""
    if live is None:
        return None
    current = live["current"]
    if current is None:
        return {"round": None, "finished": live["finished"]}
    return {
        "round": current["round"],
        "kind": current["kind"],
        "attempt": current["attempt"],
        "selected": current["selected"],
        "answered": current["answered"],
        "pending": current["pending"],
        "failed": current["failed"],
        "uploading": current["uploading"],
        "seconds_left": current["seconds_left"],
        "progress_published": current["progress_published"],
        "finished": live["finished"],
    }


def _site(site: Mapping[str, Any], current: Mapping[str, Any] | None) -> dict[str, Any]:
    failure = site["last_failure"]
    return {
        "site": site["site"],
        "status": site_status(site["site"], current, site["withdrawn"] is not None).value,
        "seen_seconds_ago": site["last_seen_seconds_ago"],
        "last_answered": site["last_answered"],  # {"round", "kind"}: the last it answered
        "failures": site["failures"],
        "last_failure": None
        if failure is None
        else f"round {failure['round']}.{failure['attempt']} {failure['kind']}: "
        f"{failure['reason']}",
        "withdrawn": site["withdrawn"],
    }


def _privacy(live: Mapping[str, Any] | None, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The privacy spent: the serving aggregator's figure, else the last figure a round
    of the run recorded; None without DP."""
    spent = None if live is None else live.get("privacy")
    if spent:
        return {k: spent.get(k) for k in ("epsilon", "delta", "epsilon_budget", "rounds")}
    recorded = [r for r in rows if isinstance(r.get("epsilon"), int | float)]
    if not recorded:
        return None
    last = max(recorded, key=lambda r: r["round"])
    return {
        "epsilon": last["epsilon"],
        "delta": last.get("delta"),
        "epsilon_budget": None,
        "rounds": last["round"],
    }
