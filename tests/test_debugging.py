"""Errors a developer can debug: a failed task's traceback (on screen with --verbose, in
the run's log, in the failure's record), --workers 0 in the main thread, simulate
--gpus, and each simulated site's state folder inside the run. Real `fedloom simulate`
processes on real workspaces."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from workspaces import FEDLOOM, make_workspace, run_cli, write_training_twist

from fedloom.runtime.tracebacks import MAX_TRACEBACK_CHARS, task_traceback

pytestmark = [pytest.mark.slow, pytest.mark.process]

RAISES = "if context.site == 'site-02': raise ValueError(f'site-02 broke in round {context.round}')"
TASK_LINE = 'task.py", line 5, in train'


def _rows(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_task_that_raises_shows_its_traceback_with_verbose_and_in_the_run_log(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, RAISES)
    args = ("--workers", "1", "--quiet", "rounds=1", "deadline.min_fraction=0.5")

    plain = run_cli("simulate", str(ws), *args, "--run-name", "plain")
    assert plain.returncode == 0, plain.stderr  # the other four sites make the quorum
    run = ws / "runs" / "plain"
    log = (run / "run.log").read_text()
    assert TASK_LINE in log and "ValueError: site-02 broke in round 1" in log
    shown = plain.stdout + plain.stderr
    assert "site-02, round 1: ValueError: site-02 broke in round 1" in shown
    assert str(run / "run.log") in shown and "--verbose" in shown  # where the rest is
    assert "Traceback" not in shown and TASK_LINE not in shown
    (failed,) = [r for r in _rows(run) if r["status"] == "error"]
    assert failed["site"] == "site-02"
    assert failed["reason"] == "ValueError: site-02 broke in round 1"
    assert TASK_LINE in str(failed["traceback"])
    assert "fedloom/runtime" not in str(failed["traceback"])  # from the user's code down

    verbose = run_cli("simulate", str(ws), *args, "--run-name", "verbose", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    shown = verbose.stdout + verbose.stderr
    assert "Traceback (most recent call last)" in shown and TASK_LINE in shown
    assert "ValueError: site-02 broke in round 1" in shown
    assert TASK_LINE in (ws / "runs" / "verbose" / "run.log").read_text()


def test_a_run_that_fails_in_the_task_logs_its_traceback(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, "raise KeyError('no such column')")
    proc = run_cli(
        "simulate", str(ws), "--workers", "0", "--quiet", "--run-name", "down",
        "rounds=1", "deadline.retries=0",
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr  # no quorum: every site failed
    log = (ws / "runs" / "down" / "run.log").read_text()
    assert TASK_LINE in log and "KeyError: 'no such column'" in log
    # every site failed: whether the others were still waited for is a race, so not asserted
    assert "the run failed: round 1: 0 of 5 sites answered" in log
    summary = json.loads((ws / "runs" / "down" / "summary.json").read_text())
    assert summary["status"] == "failed"


def test_workers_0_runs_each_task_in_the_main_thread_of_the_simulate_process(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    seen = tmp_path / "seen.txt"
    write_training_twist(
        ws,
        f"open({str(seen)!r}, 'a').write(f'{{__import__(\"os\").getpid()}} "
        "{threading.current_thread() is threading.main_thread()}\\n')",
    )
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.Popen(  # noqa: S603 - our own command
        [*FEDLOOM, "simulate", str(ws), "--workers", "0", "--quiet", "rounds=2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    lines = seen.read_text().splitlines()
    assert len(lines) == 10  # 5 sites, 2 rounds
    assert set(lines) == {f"{proc.pid} True"}


def test_ctrl_c_in_a_task_run_in_the_main_thread_stops_the_run_cleanly(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    # the task itself is interrupted, as a developer's Ctrl-C in a debugger session is
    write_training_twist(
        ws,
        "if context.round == 2: __import__('os').kill(__import__('os').getpid(), "
        "__import__('signal').SIGINT)",
    )
    proc = run_cli(
        "simulate", str(ws), "--workers", "0", "--quiet", "--run-name", "stopped", "rounds=3"
    )
    assert proc.returncode == 130, proc.stderr
    summary = json.loads((ws / "runs" / "stopped" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert {r["round"] for r in _rows(ws / "runs" / "stopped")} <= {1, 2}


def test_gpus_the_machine_lacks_are_refused_before_anything_starts(tmp_path: Path) -> None:
    """One GPU more than the machine has: on a CPU-only machine --gpus 1 (no CUDA at
    all), on a GPU machine one beyond its count."""
    torch = pytest.importorskip("torch")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ws = make_workspace(tmp_path, "breast-cancer")
    proc = run_cli("simulate", str(ws), "--gpus", str(have + 1), "--quiet")
    assert proc.returncode == 3, proc.stderr
    if have == 0:
        assert "--gpus 1 asked for, but torch sees no CUDA GPU" in proc.stderr
        assert "run without --gpus" in proc.stderr
    else:
        assert f"--gpus {have + 1} asked for, but this machine has {have} CUDA GPU" in proc.stderr
    assert not (ws / "runs").exists()  # refused before anything was written
    negative = run_cli("simulate", str(ws), "--gpus", "-1", "--quiet")
    assert negative.returncode == 2


COUNTER = (
    "p = context.state_dir / 'count'; n = int(p.read_text()) + 1 if p.exists() else 1; "
    "p.write_text(str(n)); context.log_metric('count', n)"
)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_each_simulated_sites_state_folder_lives_in_the_run_across_rounds(
    tmp_path: Path, workers: str
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, COUNTER)
    proc = run_cli(
        "simulate", str(ws), "--workers", workers, "--quiet", "--run-name", "kept",
        "rounds=3", "sites_per_round=3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = ws / "runs" / "kept"
    trained: dict[str, int] = {}
    for row in _rows(run):
        if row["kind"] == "train" and row["status"] == "ok":
            site = str(row["site"])
            trained[site] = trained.get(site, 0) + 1
            assert row["count"] == trained[site]  # what the site's folder held, plus one
    assert trained and sum(trained.values()) == 9
    for site, rounds in trained.items():
        assert (run / "sites" / site / "count").read_text() == str(rounds)


def test_a_traceback_is_bounded_and_printable() -> None:
    def deep(n: int) -> None:
        if n == 0:
            raise RuntimeError("x" * 100_000 + "\x1b[31m")
        deep(n - 1)

    try:
        deep(200)
    except RuntimeError as err:
        text = task_traceback(err)
    assert len(text) <= MAX_TRACEBACK_CHARS
    assert "\x1b" not in text and "\\x1b" in text  # an escape cannot drive a terminal
    assert text.count("in deep\n") <= 50 and "RuntimeError: xxx" in text


def test_a_real_site_keeps_its_traceback_and_sends_the_aggregator_one_line(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, RAISES)
    proc = run_cli(
        "simulate", str(ws), "--transport", "grpc", "--quiet", "--run-name", "real",
        "rounds=1", "deadline.min_fraction=0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site_log = (ws / "sites" / "site-02" / "collaborator.log").read_text()
    assert TASK_LINE in site_log and "ValueError: site-02 broke in round 1" in site_log
    (failed,) = [r for r in _rows(ws / "runs" / "real") if r["status"] == "error"]
    assert failed["reason"] == "ValueError: site-02 broke in round 1"
    assert "traceback" not in failed
    aggregator_log = (ws / "aggregator" / "aggregator.log").read_text()
    assert "Traceback" not in aggregator_log and TASK_LINE not in aggregator_log
