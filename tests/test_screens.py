"""What the commands print, read as a user reads it: on a terminal (a real pseudo-
terminal), through a pipe (a log, CI), and when the aggregator's port is taken. Every
command here is a real ``fedloom`` process."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest
from workspaces import FEDLOOM, make_workspace, write_training_twist

from fedloom.core.errors import StateError, TransportError
from fedloom.core.records import (
    CloseReason,
    Failure,
    FailureKind,
    Instruction,
    InstructionKind,
    RoundRecord,
)
from fedloom.pki import provision
from fedloom.plan import load_plan
from fedloom.store.runs import RunStore
from fedloom.store.status import read_status

pytestmark = pytest.mark.process

# what a user's shell would hand fedloom: no COLUMNS (a pipe is then 80 columns to rich),
# no GRPC_VERBOSITY, no colours (the text is compared)
ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "GRPC_VERBOSITY")}
ENV["NO_COLOR"] = "1"


def in_terminal(*args: str, columns: int = 200, timeout: float = 300) -> tuple[int, str]:
    """Run ``fedloom ARGS`` with a pseudo-terminal as its stdout and stderr (as in a
    shell, ``columns`` wide); its exit code and everything it wrote, escapes included."""
    parent, child = pty.openpty()
    proc = subprocess.Popen(  # noqa: S603 - our own command
        [*FEDLOOM, *args],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env={**ENV, "COLUMNS": str(columns)},
    )
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([parent], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(parent, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(parent)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_a_terminal_sees_the_workers_start_and_the_attack_before_the_rounds(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    code, out = in_terminal(
        "simulate", str(ws), "rounds=1", "sites=3", "--workers", "2",
        "--attack", "sign-flip", "--attackers", "1", "--run-name", "seen",
    )  # fmt: skip
    assert code == 0, out
    [attacker] = json.loads((ws / "runs" / "seen" / "summary.json").read_text())["attackers"]
    header = f"attack sign-flip (each sends minus its update), by 1 of 3 sites: {attacker}"
    assert header in out, out
    starting = out.index("starting 2 worker processes for the sites' local work")
    # no bar frozen at "round 0" while the workers start: it appears once they are up
    assert "round 0" not in out, out
    assert starting < out.index("round 1/1") < out.index("final evaluation"), out
    assert "val accuracy (global model) " in out  # which accuracy the bar shows


def test_piped_output_is_neither_wrapped_nor_cut_at_80_columns(tmp_path: Path) -> None:
    root = tmp_path / "a-folder-whose-name-is-long-enough-to-push-every-path-past-80-columns"
    ws = make_workspace(root, "breast-cancer")
    why = "the site's accelerator reported an error it could not recover from"
    write_training_twist(ws, f"if context.site == 'site-02': raise RuntimeError({why!r})")
    done = subprocess.run(  # noqa: S603 - our own command
        [*FEDLOOM, "simulate", str(ws), "rounds=1", "sites=3", "--workers", "0",
         "deadline.min_fraction=0.5", "--run-name", "piped"],
        capture_output=True, text=True, env=ENV, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run = ws / "runs" / "piped"
    lines = done.stdout.splitlines()
    # the progress line, whole: the bar, the rounds, the elapsed time and the ETA
    [progress] = [line for line in lines if line.startswith("final evaluation")]
    assert "━" in progress and " 2/2 " in progress and "ETA 0:00:00" in progress, progress
    assert f"Results in {run}" in lines, done.stdout
    failed = f"site-02, round 1: RuntimeError: {why} (its traceback is in {run / 'run.log'};"
    assert any(line.startswith(failed) for line in done.stderr.splitlines()), done.stderr


def test_piped_status_keeps_each_failure_on_one_line(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    why = "RuntimeError: the site's accelerator reported an error it could not recover from"
    plan = load_plan(ws, [])
    store = RunStore(ws / "aggregator")
    try:
        run = store.new_run("failed", ws / "runs" / "failed", "hash", plan.model_dump_json())
        journal = store.journal(run, lambda: (0, 0))
        task = Instruction(round=1, kind=InstructionKind.TRAIN, attempt_id=f"{run.run_id}/1.1")
        journal.opened(task, 1, plan.roster)
        failures = (Failure("site-02", 1, FailureKind.ERROR, why),)
        record = RoundRecord(
            1, InstructionKind.TRAIN, plan.roster, (), failures, CloseReason.NO_QUORUM
        )
        journal.closed(record, None)
        store.mark(run, "failed", "round 1: no quorum")
    finally:
        store.close()
    done = subprocess.run(  # noqa: S603 - our own command
        [*FEDLOOM, "status", str(ws)],
        capture_output=True, text=True, env=ENV, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"round 1.1 error: {why}" in done.stdout, done.stdout


def test_a_taken_port_is_said_in_fedloom_words_alone_and_leaves_no_run_to_resume(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    provision(ws, [])  # the federation's CA and the aggregator's certificate
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for _ in range(2):  # a second start finds nothing to resume either
            done = subprocess.run(  # noqa: S603 - our own command
                [*FEDLOOM, "aggregator", "start", str(ws), "--host", "127.0.0.1",
                 "--port", str(port), "--quiet"],
                capture_output=True, text=True, env=ENV, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == TransportError.exit_code, done.stdout + done.stderr
            # fedloom's message first and alone: no line of gRPC's own core before it
            first, *_ = done.stderr.splitlines()
            assert first == (
                f"error: cannot listen on 127.0.0.1:{port}: the port is taken "
                "(Address already in use)"
            ), done.stderr
            assert "GRPC_VERBOSITY" not in done.stderr and "what the run did" not in done.stderr
            assert "resuming" not in done.stdout, done.stdout
    with pytest.raises(StateError, match="no run is recorded"):
        read_status(ws / "aggregator")
    assert not list((ws / "runs").iterdir())  # no run folder either
