"""``fedloom status``: what a workspace's aggregator is doing, or what its last run did.

It reads the aggregator's state database without writing it (see
:mod:`fedloom.store.status`), so it is safe beside a running aggregator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from fedloom.cli.common import WorkspaceArg, console, count, friendly, human_bytes
from fedloom.core.records import CloseReason
from fedloom.core.sanitize import printable


@friendly
def status(
    workspace: WorkspaceArg,
    run: Annotated[
        str | None, typer.Option("--run", help="The run's name (default: the latest run).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print everything as JSON instead of tables.")
    ] = False,
) -> None:
    """Show the aggregator's run: rounds, the round under way, the sites, the metrics.

    Reads WORKSPACE/aggregator/state.db without writing it: safe beside a running
    aggregator, and on a stopped workspace.
    """
    from fedloom.store.status import read_status

    data = read_status(Path(workspace) / "aggregator", run)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    _print_run(data, workspace)
    if data["live"] is not None:
        _print_live(data["live"])
    _print_sites(data["sites"])
    for title, closed in (
        ("last finished round", data["last_round"]),
        ("final evaluation", data["evaluation"]),
    ):
        if closed is not None:
            _print_metrics(title, closed)
    _print_attempts(data["recent_attempts"], serving=data["aggregator"]["serves_this_run"])


def _print_run(data: dict[str, Any], workspace: Path) -> None:
    run, agg, rounds = data["run"], data["aggregator"], data["rounds"]
    console.print(
        f"run [bold]{run['name']}[/] ({run['run_id']}): [bold]{run['status']}[/]", highlight=False
    )
    if run["error"]:
        console.print(f"  error: {escape(run['error'])}", highlight=False)
    if agg["serves_this_run"]:
        console.print(f"aggregator running (pid {agg['pid']})", highlight=False)
    elif agg["running"]:
        console.print(
            f"an aggregator is running (pid {agg['pid']}), serving a later run", highlight=False
        )
    else:
        console.print("no aggregator running", highlight=False)
    if data["stopped_without_record"]:
        console.print(
            "[yellow]the aggregator stopped without recording it (killed, or its machine "
            "went down)[/]",
            highlight=False,
        )
    if data["resumable"]:
        console.print(f"[cyan]fedloom aggregator start {workspace}[/] resumes it", highlight=False)
    planned = "?" if rounds["planned"] is None else rounds["planned"]
    last = rounds["last_finished"]
    console.print(
        f"rounds: {rounds['finished']} of {planned} finished"
        + ("" if last is None else f" (the last: round {last})")
        + f"; {rounds['elapsed_seconds']:.1f} s, {human_bytes(rounds['bytes_sent'])} sent, "
        f"{human_bytes(rounds['bytes_received'])} received",
        highlight=False,
    )


def _print_live(live: dict[str, Any]) -> None:
    age = f"(live state {live['age_seconds']:.1f} s old)"
    privacy = live.get("privacy")
    if privacy:
        budget = privacy.get("epsilon_budget")
        accountant = str(privacy.get("accountant", "rdp")).upper()
        console.print(
            f"privacy: epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} "
            f"({accountant} accountant) after {privacy['rounds']} round(s)"
            + (f", budget {budget:g}" if budget is not None else "")
            + f"; clip {privacy['clip']:.3g}",
            highlight=False,
        )
    current = live["current"]
    if current is None:
        what = "the federation is over: telling the sites" if live["finished"] else "between rounds"
        console.print(f"now: {what} {age}", highlight=False)
        return
    now = (
        f"now: round {current['round']} ({current['kind']}, attempt {current['attempt']}, "
        f"task {current['attempt_id']})"
    )
    if not current.get("progress_published", True):
        console.print(
            f"{now}, just opened: its sites' progress is not published yet {age}",
            highlight=False,
        )
        return
    console.print(f"{now}, {current['seconds_left']:.0f} s to its deadline {age}", highlight=False)
    answered = ", ".join(current["answered"]) or "none yet"
    console.print(
        f"  answered: {len(current['answered'])} of {len(current['selected'])} selected "
        f"sites ({answered})",
        highlight=False,
    )
    for site, reason in current["failed"].items():
        console.print(f"  failed: {site}: {escape(reason)}", highlight=False)
    for site, received in current["uploading"].items():
        console.print(f"  uploading: {site} ({human_bytes(received)} received)", highlight=False)
    if current["pending"]:
        console.print(f"  pending: {', '.join(current['pending'])}", highlight=False)


def _print_sites(sites: list[dict[str, Any]]) -> None:
    if not sites:
        return
    table = Table("site", "last seen", "last answered", "failures", "latest failure", title="Sites")
    for s in sites:
        seen = s["last_seen_seconds_ago"]
        answered = s["last_answered"]
        failure = s["last_failure"]
        table.add_row(
            s["site"],
            "-" if seen is None else f"{seen:.1f} s ago",
            _answered(answered),
            str(s["failures"]),
            "-"
            if failure is None
            else f"round {failure['round']}.{failure['attempt']} {failure['kind']}: "
            f"{escape(failure['reason'])}",
        )
    console.print(table)
    for s in sites:
        if s.get("withdrawn") is not None:
            console.print(
                f"[yellow]{s['site']} withdrew:[/] {escape(s['withdrawn'])} (rounds do not "
                "wait for it until it is started again)",
                highlight=False,
            )


def _answered(answered: dict[str, Any] | None) -> str:
    if answered is None:
        return "-"
    if answered["kind"] == "evaluate":
        return f"final evaluation (round {answered['round']})"
    return f"round {answered['round']}"


def reason_text(reason: str | None) -> str | None:
    """A close reason's stable id in words (an id this version does not know, as it is)."""
    try:
        return None if reason is None else CloseReason(reason).text
    except ValueError:
        return printable(reason)


def _print_metrics(title: str, closed: dict[str, Any]) -> None:
    console.print(
        f"{title}: round {closed['round']} (attempt {closed['attempt']}), "
        f"{reason_text(closed['close_reason'])}; mean of {count(closed['sites_answered'], 'site')}",
        highlight=False,
    )
    table = Table("metric", "sample-weighted mean")
    for name, value in closed["metrics"].items():
        table.add_row(escape(name), f"{value:.4f}")
    console.print(table)
    if closed.get("metrics_not_shown"):
        console.print(f"  ({closed['metrics_not_shown']} more metrics not shown)", highlight=False)


def _print_attempts(attempts: list[dict[str, Any]], *, serving: bool) -> None:
    if not attempts:
        return
    table = Table("round", "attempt", "kind", "closed as", title="Latest attempts")
    for i, a in enumerate(attempts):
        reason = reason_text(a["close_reason"])
        if a["closed"] is None:
            last = i == len(attempts) - 1
            reason = "open" if serving and last else "left open (the aggregator stopped)"
        elif reason is None:  # a round rebuilt from its checkpoint
            reason = "-"
        if a["superseded"]:
            reason += " (superseded: the round reran)"
        table.add_row(str(a["round"]), str(a["attempt"]), a["kind"], reason)
    console.print(table)
