"""One hostile site must not stop the federation (issue 14): the attacks against real
OS processes over gRPC with mutual TLS, certificates from the project's own PKI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_deploy import ENV, finish, kill_leftovers, rows_by_round, start_aggregator, start_site
from workspaces import make_workspace, run_cli

from fedloom.pki import provision

pytestmark = pytest.mark.process

HOSTILE = Path(__file__).with_name("hostile_site.py")
SITES = ("site-01", "site-02", "site-03")


def start_hostile(
    ws: Path, plan: list[str], site: str, port: int, *, attack: int, out: Path
) -> subprocess.Popen[bytes]:
    """The hostile site, its output going to ``out`` (it may say a lot)."""
    state = ws / "sites" / site
    where = [str(ws), str(state), site, str(port)]
    with open(out, "wb") as sink:
        return subprocess.Popen(  # noqa: S603 - our own script
            [sys.executable, str(HOSTILE), "--attack", str(attack), *where, *plan],
            env=ENV,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def test_cancelled_long_polls_from_one_site_never_stop_the_honest_ones(tmp_path: Path) -> None:
    """site-03 asks for work with an hour's wait and hangs up 10 ms later, from six
    threads, for the whole run (some thousands of calls). Each wait ends with its call,
    so the server's threads never fill up: the honest sites join and answer every
    round. (Before, the waits outlived their calls: the threads were soon all waiting
    for nobody, no honest site could say Hello, and the aggregator exited 7.)"""
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = [
        "sites=3",
        "rounds=3",
        "deadline.min_fraction=0.6",
        "deadline.round_seconds=60",
        "deadline.retries=0",
        "evaluation.final=false",
    ]
    provision(ws, list(SITES))
    aggregator, port = start_aggregator(ws, plan, "attacked")
    said = tmp_path / "hostile.out"
    hostile = start_hostile(ws, plan, "site-03", port, attack=6, out=said)
    sites: list[subprocess.Popen[bytes]] = []
    try:
        # the attack is under way before the honest sites start
        wait_for(
            lambda: "attacking from 6 threads" in said.read_text() or hostile.poll() is not None
        )
        assert hostile.poll() is None, said.read_text()
        sites = [start_site(ws, plan, s, port) for s in SITES[:2]]
        finish(aggregator, sites)
        assert hostile.wait(timeout=60) == 0, said.read_text()
        out = said.read_text()
    finally:
        kill_leftovers(aggregator, hostile, *sites)
    cancelled = int(out.rsplit("hostile: ", 1)[1].split()[0])
    assert cancelled > 100, out  # the attack ran, and ran on
    by_round = rows_by_round(ws / "runs" / "attacked")
    assert sorted(by_round) == [1, 2, 3]
    for rnd, answers in by_round.items():
        assert {answers[s]["status"] for s in SITES[:2]} == {"ok"}, (rnd, answers)
        assert answers["site-03"]["reason"] == "this site declines", answers


def test_a_second_collaborator_on_one_identity_replaces_the_first_which_stops_saying_why(
    tmp_path: Path,
) -> None:
    """Two collaborators on site-02's certificate (a copy of its state folder: the key
    on two machines). The second one's Hello replaces the first one's session: the
    aggregator logs a warning naming both addresses, the first stops with exit 11 and
    the reason on its screen, and the second answers for site-02 from then on."""
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = ["sites=2", "rounds=3", "deadline.round_seconds=120"]
    provision(ws, ["site-01", "site-02"])
    copy = tmp_path / "copy-of-site-02"
    shutil.copytree(ws / "sites" / "site-02", copy)
    aggregator, port = start_aggregator(ws, plan, "twice")
    first = start_site(ws, plan, "site-02", port)
    sites: list[subprocess.Popen[bytes]] = []
    try:
        # round 1 waits for site-01, which is not there yet: the first site-02 has
        # answered it and waits for round 2 when the second starts
        log = ws / "aggregator" / "aggregator.log"
        wait_for(lambda: "round 1: update from site-02 accepted" in log.read_text())
        sites.append(start_site(ws, plan, "site-02", port, "--state", str(copy)))
        out = first.communicate(timeout=120)[0].decode()
        assert first.returncode == 11, out
        said = " ".join(out.split())
        assert "another collaborator process said Hello as 'site-02'" in said, out
        assert "replaced this one's session" in said, out
        sites.append(start_site(ws, plan, "site-01", port))
        finish(aggregator, sites)
    finally:
        kill_leftovers(aggregator, first, *sites)
    logged = " ".join(log.read_text().split())
    assert "site site-02: a second collaborator process said Hello with its certificate" in logged
    assert "replaces the session of the one at" in logged
    by_round = rows_by_round(ws / "runs" / "twice")
    for rnd in (1, 2, 3, 4):
        assert {r["status"] for r in by_round[rnd].values()} == {"ok"}, by_round[rnd]
    stopped = " ".join((ws / "sites" / "site-02" / "collaborator.log").read_text().split())
    assert "stopped: the aggregator refused this site: another collaborator process" in stopped


def test_a_second_collaborator_on_one_state_folder_exits_naming_it_and_its_holder(
    tmp_path: Path,
) -> None:
    """Two collaborators on one state folder would interleave its audit log until
    `fedloom audit verify` fails: the second is refused before it touches anything."""
    ws = make_workspace(tmp_path, "breast-cancer")
    state = provision(ws, ["site-01"])["site-01"]
    # no aggregator: the first collaborator waits for it, holding its folder
    first = start_site(ws, [], "site-01", 1)
    try:
        wait_for(lambda: (state / "collaborator.lock").exists() and _locked(state))
        second = run_cli(
            "collaborator", "start", str(ws), "--name", "site-01", "--aggregator", "127.0.0.1:1"
        )
        assert first.poll() is None  # the first one is untouched
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 8, second.stdout + second.stderr
    said = " ".join((second.stdout + second.stderr).split())
    assert f"the site state folder {state} is in use by another collaborator" in said, said
    assert f"pid {first.pid} on" in said, said
    assert "--state" in said
    # the lock dies with its process: a collaborator starts on the folder again
    again = start_site(ws, [], "site-01", 1)
    try:
        wait_for(lambda: _holder(state) == again.pid)
    finally:
        again.kill()
        again.wait()


def _locked(state: Path) -> bool:
    return _holder(state) is not None


def _holder(state: Path) -> int | None:
    text = (
        (state / "collaborator.lock").read_text() if (state / "collaborator.lock").exists() else ""
    )
    return int(text.split()[1]) if text.startswith("pid ") else None


def wait_for(condition: object, timeout: float = 120) -> None:
    import time

    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "it never happened"
        time.sleep(0.1)
