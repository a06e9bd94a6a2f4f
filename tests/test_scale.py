"""1,000 simulated sites in bounded memory: a site's data exist only while it works."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
from workspaces import FEDLOOM, make_workspace

pytestmark = [pytest.mark.slow, pytest.mark.process]

LIMIT_BYTES = 2 * 1024**3


def _tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def test_a_thousand_synthetic_sites_stay_under_2_gb(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "synthetic")
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.Popen(
        [*FEDLOOM, "simulate", str(ws), "--sites", "1000", "--rounds", "1", "--quiet",
         "--run-name", "thousand"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    root = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):  # measuring the tree, not waiting on fedloom
            try:
                peak = max(peak, _tree_pss(root))
            except psutil.NoSuchProcess:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=600)
    done.set()
    sampler.join(timeout=10)
    assert proc.returncode == 0, err
    summary = json.loads((ws / "runs" / "thousand" / "summary.json").read_text())
    assert summary["sites"] == 1000
    rows = (ws / "runs" / "thousand" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2000  # one training round and the final evaluation, every site
    assert 0 < peak < LIMIT_BYTES, f"peak PSS of the process tree {peak / 2**20:.0f} MiB"
    print(f"1,000 sites: {summary['seconds_per_round']:.2f} s/round, peak {peak / 2**20:.0f} MiB")
