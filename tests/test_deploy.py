"""A real deployment on loopback: the aggregator and each site as their own OS
processes, mutual TLS with certificates made by the project's PKI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from workspaces import PADDED_TASK, make_workspace, run_cli

from fedloom.core.weights import weights_equal
from fedloom.deployment import launcher
from fedloom.pki import provision
from fedloom.store import load_weights, save_weights
from fedloom.store.checkpoint import read_metadata
from fedloom.store.status import read_status

pytestmark = pytest.mark.process

ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}


def rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def rows_by_round(run_dir: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """metrics.jsonl as round -> site -> row (the last attempt's row wins)."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows(run_dir):
        by_round.setdefault(row["round"], {})[row["site"]] = row
    return by_round


def finish(aggregator: subprocess.Popen[bytes], sites: list[subprocess.Popen[bytes]]) -> None:
    """The aggregator and every site end cleanly (exit 0)."""
    out = aggregator.communicate(timeout=300)[0].decode()
    assert aggregator.returncode == 0, out
    for proc in sites:
        assert proc.wait(timeout=60) == 0, proc.communicate()[0].decode()


def kill_leftovers(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


GRPC_RUN = ("--sites", "3", "--rounds", "5", "--quiet")
GRPC_SITES = ("site-01", "site-02", "site-03")


@pytest.fixture(scope="module")
def grpc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workspace of a 3-site federation run as real processes on loopback
    (``simulate --transport grpc``), its run named ``grpc``."""
    ws = make_workspace(tmp_path_factory.mktemp("deploy"), "digits")
    real = run_cli("simulate", str(ws), *GRPC_RUN, "--transport", "grpc", "--run-name", "grpc")
    assert real.returncode == 0, real.stderr + real.stdout
    return ws


def test_grpc_federation_ends_bit_identical_to_the_in_process_run(grpc_run: Path) -> None:
    ws = grpc_run
    simulated = run_cli("simulate", str(ws), *GRPC_RUN, "--run-name", "inprocess")
    assert simulated.returncode == 0, simulated.stderr

    runs = ws / "runs"
    grpc_weights = load_weights(runs / "grpc" / "final.safetensors")
    assert weights_equal(grpc_weights, load_weights(runs / "inprocess" / "final.safetensors"))
    summary = json.loads((runs / "grpc" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["failures"] == 0
    assert summary["test_accuracy"] > 0.8
    assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0
    # every site made its own key, in its own state folder, and the CA never saw it
    for site in GRPC_SITES:
        state = ws / "sites" / site
        assert (state / "site.key").stat().st_mode & 0o077 == 0
        assert "joined federation" in (state / "collaborator.log").read_text()
    assert not list((ws / "pki").rglob("*site*.key"))
    assert "joined (certificate serial" in (ws / "aggregator" / "aggregator.log").read_text()


def test_every_site_keeps_the_final_model_signed_and_identical_to_the_aggregators(
    grpc_run: Path, tmp_path: Path
) -> None:
    ws = grpc_run
    final = load_weights(ws / "runs" / "grpc" / "final.safetensors")
    for site in GRPC_SITES:
        state = ws / "sites" / site
        (kept,) = (state / "final").glob("*.safetensors")
        assert weights_equal(load_weights(kept), final), site
        screen = (state / "collaborator.out").read_text()  # what the site's screen showed
        assert f"the final model is kept in {kept} (check it: fedloom audit model" in screen
        checked = run_cli("audit", "model", str(kept))  # with the site's own ca.crt
        assert checked.returncode == 0, checked.stderr
        assert "final model intact: " in checked.stdout
        assert f"kept by {site}" in checked.stdout
    # one value changed, the header kept: refused, naming the file
    changed = {name: array.copy() for name, array in final.items()}
    first = next(iter(changed))
    changed[first].reshape(-1)[0] += 1
    tampered = tmp_path / "tampered.safetensors"
    save_weights(tampered, changed, metadata=read_metadata(kept))
    refused = run_cli("audit", "model", str(tampered), "--ca", str(ws / "pki" / "ca.crt"))
    assert refused.returncode == 13, refused.stdout + refused.stderr
    assert "is not the model the aggregator signed" in refused.stderr


def start_aggregator(
    ws: Path, plan: list[str], run_name: str, *extra: str
) -> tuple[subprocess.Popen[bytes], int]:
    proc, port = launcher.start_aggregator(
        ws,
        plan,
        "--run-name",
        run_name,
        "--quiet",
        *extra,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert port is not None, proc.communicate(timeout=30)[0].decode()
    return proc, port


def start_site(
    ws: Path, plan: list[str], name: str, port: int, *extra: str
) -> subprocess.Popen[bytes]:
    return launcher.start_collaborator(
        ws,
        plan,
        name,
        port,
        "--give-up-after",
        "60",
        *extra,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_a_site_killed_mid_upload_and_restarted_answers_the_same_round(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    (ws / "task.py").write_text(PADDED_TASK)
    plan = ["sites=3", "rounds=4", "deadline.round_seconds=120"]
    provision(ws, ["site-01", "site-02", "site-03"])
    # silence never drops a site here: the restart, however slow, finds the round open
    aggregator, port = start_aggregator(ws, plan, "killed", "--dead-after", "600")
    sites = [start_site(ws, plan, s, port) for s in ("site-01", "site-02")]
    try:
        doomed = start_site(ws, plan, "site-03", port, "--fault", "site.upload.chunk@2:1")
        assert doomed.wait(timeout=120) == -9  # SIGKILLed, mid-upload of round 2
        sites.append(start_site(ws, plan, "site-03", port))  # restarted
        finish(aggregator, sites)
    finally:
        kill_leftovers(aggregator, *sites)

    log = (ws / "aggregator" / "aggregator.log").read_text()
    assert "round 2: update from site-03 rejected: upload broke off" in log
    by_round = rows_by_round(ws / "runs" / "killed")
    # the broken stream was rolled back and the restarted site answered round 2 itself
    for rnd in (1, 2, 3, 4, 5):
        assert {s: r["status"] for s, r in by_round[rnd].items()} == dict.fromkeys(
            ("site-01", "site-02", "site-03"), "ok"
        ), by_round[rnd]
        assert {r["close_reason"] for r in by_round[rnd].values()} == {"all_answered"}


def test_a_dead_site_is_dropped_by_its_silence_long_before_the_deadline(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = ["sites=3", "rounds=2", "deadline.min_fraction=0.6", "deadline.round_seconds=600"]
    provision(ws, ["site-01", "site-02", "site-03"])
    aggregator, port = start_aggregator(
        ws, plan, "silent", "--heartbeat", "0.5", "--dead-after", "4"
    )
    sites = [start_site(ws, plan, s, port) for s in ("site-01", "site-02")]
    try:
        doomed = start_site(ws, plan, "site-03", port, "--fault", "site.upload.chunk@2:0")
        assert doomed.wait(timeout=120) == -9  # dead for good in round 2
        finish(aggregator, sites)
    finally:
        kill_leftovers(aggregator, *sites)

    by_round = rows_by_round(ws / "runs" / "silent")
    assert by_round[1]["site-03"]["status"] == "ok"
    for rnd in (2, 3):  # 3: the final evaluation
        dead = by_round[rnd]["site-03"]
        assert dead["status"] == "disconnected", dead
        assert "no sign of life for" in dead["reason"], dead
        # closed once the others answered and the silence was noticed: a 600 s deadline
        # would read "deadline_quorum"
        assert dead["close_reason"] == "quorum", dead
        assert {by_round[rnd][s]["status"] for s in ("site-01", "site-02")} == {"ok"}
    # the state database keeps the events: who joined, who was dropped and why
    with sqlite3.connect(ws / "aggregator" / "state.db") as db:
        events = db.execute("SELECT kind, round, site, detail FROM events").fetchall()
    joined = {site for kind, _, site, _ in events if kind == "joined"}
    assert joined == {"site-01", "site-02", "site-03"}
    dropped = [(rnd, d) for kind, rnd, site, d in events if kind == "failed" and site == "site-03"]
    assert [rnd for rnd, _ in dropped] == [2, 3]
    assert all("no sign of life for" in d for _, d in dropped)


def test_one_site_of_four_never_answering_the_others_complete_every_round_with_quorum(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    # one training round, which waits out its whole deadline (no final evaluation: it
    # would wait out another)
    plan = ["sites=4", "rounds=1", "evaluation.final=false", "deadline.min_fraction=0.75"]
    plan.append("deadline.round_seconds=20")
    provision(ws, ["site-01", "site-02", "site-03", "site-04"])  # site-04 never starts
    aggregator, port = start_aggregator(ws, plan, "three")
    sites = [start_site(ws, plan, s, port) for s in ("site-01", "site-02", "site-03")]
    try:
        # `fedloom status` beside the running aggregator: the round under way, live
        # the round under way, once the aggregator published its sites' progress
        live = wait_for_status(
            ws, lambda s: ((s["live"] or {}).get("current") or {}).get("progress_published")
        )
        assert live["run"]["status"] == "running"
        assert live["aggregator"] == {
            "running": True,
            "pid": aggregator.pid,
            "serves_this_run": True,
        }
        current = live["live"]["current"]
        assert current["selected"] == ["site-01", "site-02", "site-03", "site-04"]
        assert "site-04" in current["pending"]
        finish(aggregator, sites)
    finally:
        kill_leftovers(aggregator, *sites)

    by_round = rows_by_round(ws / "runs" / "three")
    assert sorted(by_round) == [1]
    for answers in by_round.values():
        missing = answers["site-04"]
        assert missing["status"] == "timeout", missing
        assert missing["reason"] == "no answer before the round's deadline", missing
        assert missing["attempt"] == 1
        assert {answers[s]["status"] for s in ("site-01", "site-02", "site-03")} == {"ok"}
        assert {r["close_reason"] for r in answers.values()} == {"deadline_quorum"}
    summary = json.loads((ws / "runs" / "three" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failures"] == 1
    # and on the stopped workspace: its last state
    stopped = status_of(ws)
    assert stopped["run"]["status"] == "completed" and stopped["aggregator"]["running"] is False
    assert (stopped["rounds"]["finished"], stopped["rounds"]["planned"]) == (1, 1)
    assert stopped["last_round"]["close_reason"] == "deadline_quorum"
    failures = {s["site"]: s["failures"] for s in stopped["sites"]}
    assert failures == {"site-01": 0, "site-02": 0, "site-03": 0, "site-04": 1}


def status_of(ws: Path) -> dict[str, Any]:
    done = run_cli("status", str(ws), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def wait_for_status(
    ws: Path, ready: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """``fedloom status --json`` until ``ready`` holds (the aggregator writes its live
    state once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        if (ws / "aggregator" / "state.db").exists():
            status = status_of(ws)
            if ready(status):
                return status
        assert time.monotonic() < deadline, "fedloom status never showed the running round"
        time.sleep(0.3)


BLOCKED_IN_ROUND_3 = """
import threading
from pathlib import Path

from fedloom.tasks import SoftmaxRegression


class Blocked(SoftmaxRegression):
    def train(self, weights, data, settings, context):
        if context.round == 3:  # say so, then never return (the test kills the site)
            Path({marker!r}).touch()
            threading.Event().wait()
        return super().train(weights, data, settings, context)


task = Blocked(num_features=30, num_classes=2)
"""


def test_status_and_the_summary_of_an_interrupted_run_count_the_same_rounds(
    tmp_path: Path,
) -> None:
    """Rounds 1 and 2 finish; round 3 is under way when the aggregator gets Ctrl-C.
    `fedloom status` beside it, then after it, and summary.json all say 2 rounds
    finished, and the round under way is 3 (the stopped attempt finishes none)."""
    ws = make_workspace(tmp_path, "breast-cancer")
    in_round_3 = tmp_path / "in-round-3"
    (ws / "task.py").write_text(BLOCKED_IN_ROUND_3.format(marker=str(in_round_3)))
    plan = ["sites=2", "rounds=4", "deadline.round_seconds=600"]
    provision(ws, ["site-01", "site-02"])
    aggregator, port = start_aggregator(ws, plan, "stopped")
    sites = [start_site(ws, plan, s, port) for s in ("site-01", "site-02")]
    try:
        deadline = time.monotonic() + 120
        while not (in_round_3.exists() and (ws / "aggregator" / "state.db").exists()):
            assert time.monotonic() < deadline, "no site began round 3"
            time.sleep(0.2)
        # once the aggregator published its live state (once a second)
        while read_status(ws / "aggregator")["live"] is None:
            assert time.monotonic() < deadline, "the aggregator never published its state"
            time.sleep(0.2)
        running = run_cli("status", str(ws)).stdout
        assert "rounds: 2 of 4 finished (the last: round 2)" in running, running
        assert "now: round 3 (train, attempt 1" in running, running
        aggregator.send_signal(signal.SIGINT)
        out = aggregator.communicate(timeout=120)[0].decode()
        assert aggregator.returncode == 130, out
    finally:
        kill_leftovers(aggregator, *sites)

    summary = json.loads((ws / "runs" / "stopped" / "summary.json").read_text())
    stopped = read_status(ws / "aggregator")
    assert summary["status"] == "interrupted" and stopped["run"]["status"] == "interrupted"
    assert summary["rounds_finished"] == stopped["rounds"]["finished"] == 2
    assert stopped["rounds"]["last_finished"] == 2
    assert "rounds: 2 of 4 finished (the last: round 2)" in run_cli("status", str(ws)).stdout


def test_a_collaborator_with_a_certificate_of_another_ca_exits_naming_the_cause(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    plan = ["sites=2", "rounds=1"]
    provision(ws, ["site-01", "site-02"])
    foreign = provision(tmp_path / "elsewhere", ["site-01"])["site-01"]
    aggregator, port = start_aggregator(ws, plan, "foreign")
    try:
        site = start_site(ws, plan, "site-01", port, "--state", str(foreign))
        out = site.communicate(timeout=120)[0].decode()
        assert site.returncode == 11, out
        assert "signed by another CA than the aggregator's" in " ".join(out.split())
    finally:
        aggregator.kill()
        aggregator.wait()
    # the TLS layer refuses it before any fedloom code runs at the aggregator (grpcio
    # has no hook there): the site's own log keeps the refusal and its likely cause
    logged = (foreign / "collaborator.log").read_text()
    assert "stopped: cannot reach the aggregator" in logged, logged
    assert "another CA than the aggregator's" in logged, logged


def test_a_site_certificate_its_ca_did_not_sign_is_said_before_connecting(
    tmp_path: Path,
) -> None:
    """The site trusts the federation's CA but holds a certificate of another CA: the
    aggregator would close the connection in the handshake ("Socket closed", which reads
    like an aggregator that is down); the collaborator says the cause before it
    connects (no aggregator listens here at all), exit code 10."""
    ws = make_workspace(tmp_path, "breast-cancer")
    provision(ws, ["site-01", "site-02"])
    foreign = provision(tmp_path / "elsewhere", ["site-01"])["site-01"]
    (foreign / "ca.crt").write_bytes((ws / "pki" / "ca.crt").read_bytes())
    done = run_cli(
        "collaborator", "start", str(ws), "sites=2", "--name", "site-01",
        "--aggregator", "127.0.0.1:1", "--state", str(foreign), "--give-up-after", "1",
    )  # fmt: skip
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 10, out
    assert (
        f"this site's certificate {foreign / 'site.crt'} ('site-01') was not signed by the CA"
        in out
    )
    assert "the federation's aggregator would refuse it in the TLS handshake" in out, out
    assert "is it running" not in out, out


def test_an_aggregator_without_a_pki_says_how_to_make_one(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    result = run_cli("aggregator", "start", str(ws), "--port", "0", "--quiet")
    assert result.returncode == 10, result.stdout + result.stderr
    assert "fedloom pki init" in result.stderr


@pytest.mark.parametrize("missing", ["site.key", "site.crt"])
def test_a_collaborator_without_its_certificate_says_what_to_do(
    tmp_path: Path, missing: str
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    state = provision(ws, ["site-01"])["site-01"]
    (state / missing).unlink()
    result = run_cli("collaborator", "start", str(ws), "--name", "site-01", "--give-up-after", "1")
    assert result.returncode == 10, result.stdout + result.stderr
    assert "fedloom pki" in result.stderr
