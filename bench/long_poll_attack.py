"""Round times with and without the cancelled-long-poll attack (issue 14, point 1).

    python bench/long_poll_attack.py [--rounds 10] [--threads 6]

Each run is a real deployment on loopback: ``fedloom aggregator start`` and two honest
``fedloom collaborator start`` processes (breast-cancer workspace, mutual TLS, the
project's PKI), and the hostile site (``tests/hostile_site.py``) as the third site. The
hostile site declines every task, so a round closes when the honest two have answered;
in the attacked run it also asks for work with an hour's wait and hangs up 10 ms later,
from ``--threads`` threads, for the whole run. Round times are the aggregator's own
(opened to closed, from its state database). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedloom import create_workspace
from fedloom.deployment import launcher
from fedloom.pki import provision

HOSTILE = Path(__file__).resolve().parents[1] / "tests" / "hostile_site.py"
SITES = ("site-01", "site-02", "site-03")


def run(root: Path, rounds: int, threads: int) -> tuple[list[float], str]:
    ws = create_workspace(root / "ws", "breast-cancer")
    plan = [
        "sites=3",
        f"rounds={rounds}",
        "deadline.min_fraction=0.6",
        "deadline.round_seconds=120",
        "deadline.retries=0",
        "evaluation.final=false",
    ]
    provision(ws, list(SITES))
    env = {**os.environ, "NO_COLOR": "1"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    aggregator, port = launcher.start_aggregator(ws, plan, "--run-name", "r", "--quiet", **quiet)
    assert port is not None, "the aggregator did not start"
    said = root / "hostile.out"
    where = [str(ws), str(ws / "sites" / SITES[2]), SITES[2], str(port)]
    with open(said, "wb") as out:
        hostile = subprocess.Popen(  # noqa: S603 - our own script
            [sys.executable, str(HOSTILE), "--attack", str(threads), *where, *plan],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    honest = [launcher.start_collaborator(ws, plan, s, port, **quiet) for s in SITES[:2]]
    try:
        code = aggregator.wait(timeout=1800)
        for proc in [hostile, *honest]:
            proc.wait(timeout=120)
    finally:
        for proc in [aggregator, hostile, *honest]:
            if proc.poll() is None:
                proc.kill()
    with sqlite3.connect(ws / "aggregator" / "state.db") as db:
        times = [
            closed - opened
            for opened, closed in db.execute(
                "SELECT opened, closed FROM attempts WHERE closed IS NOT NULL ORDER BY round"
            )
        ]
    last = said.read_text().strip().splitlines()[-1]
    return times, f"aggregator exit {code}; {last}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=6)
    args = parser.parse_args()
    for name, threads in (("without the attack", 0), ("under the attack", args.threads)):
        with tempfile.TemporaryDirectory(prefix="fedloom-attack-") as tmp:
            times, note = run(Path(tmp), args.rounds, threads)
        rounds = " ".join(f"{t:.2f}" for t in times)
        print(
            f"{name}: {len(times)} rounds, median {statistics.median(times):.2f} s, "
            f"max {max(times):.2f} s ({note})\n  per round (s): {rounds}"
        )


if __name__ == "__main__":
    main()
