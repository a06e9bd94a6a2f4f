"""What sites do when the aggregator stops: real processes on loopback, mutual TLS.

An aggregator interrupted (Ctrl-C) or failed resumes its run when started again, so its
collaborators wait for it, within their ``--give-up-after``, and finish without being
restarted; one cancelled on purpose (``fedloom aggregator stop --cancel``) tells them
the federation is over. A collaborator that cannot reach the aggregator says why on its
screen, once per change of reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chaos import free_port
from test_deploy import (
    ENV,
    finish,
    kill_leftovers,
    rows_by_round,
    start_aggregator,
    start_site,
)
from workspaces import make_workspace, run_cli, write_training_twist

from fedloom.deployment import launcher
from fedloom.pki import provision
from fedloom.transport.grpc.client import wait_reason

pytestmark = pytest.mark.process

# site-03 trains round 3 only once the test lets it (its first try): the round stays
# open, with the other sites waiting for work, while the aggregator is interrupted
HELD_TASK = """
import os
import pathlib

from fedloom.tasks import SoftmaxRegression


class Held(SoftmaxRegression):
    def train(self, weights, data, settings, context):
        held = pathlib.Path(os.environ["HOLD_DIR"])
        if (context.site, context.round) == ("site-03", 3) and not (held / "held").exists():
            (held / "held").touch()
            with open(held / "go") as go:  # a FIFO: blocks until the test writes to it
                go.read()
        return super().train(weights, data, settings, context)


task = Held(num_features=30, num_classes=2)
"""
SITES = ("site-01", "site-02", "site-03")


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def test_sites_wait_through_a_ctrl_c_at_the_aggregator_and_finish_once_it_resumes(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    (ws / "task.py").write_text(HELD_TASK)
    hold = tmp_path / "hold"
    hold.mkdir()
    os.mkfifo(hold / "go")
    env = {**ENV, "HOLD_DIR": str(hold)}
    plan = ["sites=3", "rounds=4", "deadline.round_seconds=300"]  # never reached
    provision(ws, list(SITES))
    aggregator, port = start_aggregator(ws, plan, "paused", "--dead-after", "600")
    sites = [
        launcher.start_collaborator(
            ws,
            plan,
            site,
            port,
            "--give-up-after",
            "120",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for site in SITES
    ]
    restarted = None
    try:
        wait_until(lambda: (hold / "held").exists(), "site-03 training round 3")
        # the others answered round 3 and wait for work: they are told that it stops
        for site in ("site-01", "site-02"):
            wait_until(lambda s=site: b"round 3: update accepted" in _read(ws, s), site)
        aggregator.send_signal(signal.SIGINT)  # Ctrl-C, mid-run
        out = aggregator.communicate(timeout=120)[0].decode()
        assert aggregator.returncode == 130, out
        assert "interrupted: stopped cleanly" in out
        # the sites were told it stopped; none quits: site-01 finds nothing listening
        site_log = ws / "sites" / "site-01" / "collaborator.log"
        wait_until(
            lambda: "retrying in" in site_log.read_text().partition("aggregator stopped")[2],
            "site-01 trying to reach the stopped aggregator",
        )
        assert [proc.poll() for proc in sites] == [None, None, None]
        # site-03's training ends now; its update finds no aggregator, and it waits too
        go = os.open(hold / "go", os.O_WRONLY | os.O_NONBLOCK)  # ENXIO if it is gone
        os.close(go)

        restarted, again = launcher.start_aggregator(
            ws,
            plan,
            "--quiet",
            "--dead-after",
            "600",
            port=port,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert again == port, restarted.communicate(timeout=30)[0].decode()
        finish(restarted, sites)  # every site exits 0, none restarted
    finally:
        kill_leftovers(aggregator, *sites, *([restarted] if restarted else []))

    by_round = rows_by_round(ws / "runs" / "paused")
    assert sorted(by_round) == [1, 2, 3, 4, 5]  # four rounds and the final evaluation
    for answers in by_round.values():  # round 3: the attempt after the restart
        assert {s: r["status"] for s, r in answers.items()} == dict.fromkeys(SITES, "ok")
    summary = json.loads((ws / "runs" / "paused" / "summary.json").read_text())
    assert summary["status"] == "completed"
    waited = sites[0].communicate()[0].decode()
    told = "the aggregator stopped before the federation completed (interrupted, or failed)"
    assert told in waited, waited
    assert f"waiting for the aggregator at 127.0.0.1:{port}: connection refused" in waited, waited
    assert f"reached the aggregator at 127.0.0.1:{port}" in waited, waited
    assert "federation finished: 4 updates accepted, 0 round(s) failed" in waited, waited


def test_a_cancelled_federation_stops_its_sites_and_never_resumes(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = ["sites=2", "rounds=3", "deadline.round_seconds=300"]
    provision(ws, ["site-01", "site-02"])  # site-02 never starts: round 1 stays open
    aggregator, port = start_aggregator(ws, plan, "called-off")
    site = start_site(ws, plan, "site-01", port)
    try:
        wait_until(lambda: b"round 1: update accepted" in _read(ws, "site-01"), "round 1")
        stopped = run_cli("aggregator", "stop", str(ws), "--cancel")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert f"asked the aggregator (pid {aggregator.pid}) to cancel" in stopped.stdout
        assert "run 'called-off': cancelled" in stopped.stdout
        out = aggregator.communicate(timeout=60)[0].decode()
        assert aggregator.returncode == 130, out
        assert "cancelled: the federation is over" in out
        told = site.communicate(timeout=60)[0].decode()
        assert site.returncode == 6, told
        assert "the aggregator's operator cancelled the federation" in told
    finally:
        kill_leftovers(aggregator, site)

    status = json.loads(run_cli("status", str(ws), "--json").stdout)
    assert status["run"]["status"] == "cancelled" and status["resumable"] is False
    summary = json.loads((ws / "runs" / "called-off" / "summary.json").read_text())
    assert summary["status"] == "cancelled"
    # with no aggregator running, a plain stop has nothing to stop
    idle = run_cli("aggregator", "stop", str(ws))
    assert idle.returncode == 8 and "no aggregator is running on" in idle.stderr


def test_a_rehearsal_whose_aggregator_fails_stops_the_sites_that_wait_for_it(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, "raise ValueError('no data today')")
    done = run_cli(
        "simulate", str(ws), "--transport", "grpc", "--quiet", "--run-name", "down",
        "sites=1", "rounds=1", "deadline.retries=0",
    )  # fmt: skip
    assert done.returncode == 7, done.stdout + done.stderr  # no quorum: the site failed
    # the site waits for an aggregator a rehearsal never starts again: stopped, not named
    assert "did not end cleanly" not in done.stderr, done.stderr
    out = (ws / "sites" / "site-01" / "collaborator.out").read_text()
    assert "the aggregator stopped before the federation completed" in out, out
    assert "interrupted: stopped cleanly" in out, out


def _read(ws: Path, site: str) -> bytes:
    log = ws / "sites" / site / "collaborator.log"
    return log.read_bytes() if log.exists() else b""


def test_a_collaborator_says_on_its_screen_why_it_waits(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    provision(ws, ["site-01", "site-02", "site-03"])
    port = free_port()  # nothing listens there
    site = start_site(ws, [], "site-01", port, "--give-up-after", "600")
    watchdog = threading.Timer(120, site.kill)  # a hang fails the test, never the suite
    watchdog.start()
    lines: list[str] = []
    try:
        assert site.stdout is not None
        for raw in site.stdout:
            lines.append(raw.decode())
            if "waiting for the aggregator" in lines[-1]:
                break
        # more tries fail for the same reason (the log has each): the screen stays quiet
        log = ws / "sites" / "site-01" / "collaborator.log"
        wait_until(lambda: log.read_text().count("retrying in") >= 3, "three retries")
    finally:
        watchdog.cancel()
        site.kill()
    lines += site.communicate()[0].decode().splitlines(keepends=True)
    shown = "".join(lines)
    # the site policy's line (here: that it has none) comes first, then the connecting one
    assert lines[0].startswith("warning: no site policy ("), shown
    assert lines[1].startswith(f"site site-01 of breast-cancer: connecting to 127.0.0.1:{port}")
    waiting = [line for line in lines if "waiting for the aggregator" in line]
    assert waiting == [
        f"waiting for the aggregator at 127.0.0.1:{port}: connection refused: nothing "
        "listens at that address; trying again, giving up after 600 s without an answer\n"
    ], shown
    assert "joined" not in shown  # said only once connected


@pytest.mark.parametrize(
    ("details", "reason"),
    [
        (
            "Hello: failed to connect to all addresses; last error: UNKNOWN: "
            "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused",
            "connection refused: nothing listens at that address",
        ),
        (
            "Hello: errors resolving agg.invalid:7171: [field:hostname lookup error:address "
            "lookup failed for agg.invalid:7171: Domain name not found]",
            "the host name does not resolve",
        ),
        ("GetInstruction: Socket closed", "the connection was closed during the TLS handshake"),
        ("GetInstruction: Connection reset by peer", "the connection was reset"),
        ("Hello: last error: something new", "something new"),
    ],
)
def test_the_waiting_reason_is_short_and_plain(details: str, reason: str) -> None:
    assert wait_reason(details) == reason
