"""A model of GIB gibibytes (float32) through one FedAvg round over gRPC with mutual TLS.

    python bench/grpc_large_model.py [--gib 1.0] [--tensors 16] [--sites 2]

Starts a real aggregator and SITES collaborators as OS processes on loopback (the
workspace's PKI made by fedloom's own code), runs one training round with no
evaluation, and reports:

- the aggregator's peak resident memory (VmHWM from /proc, read while it runs and just
  before it exits), as bytes and as a multiple of the model's bytes;
- each collaborator's peak resident memory;
- the round's transfer throughput: bytes moved (model down to every site, updates up)
  over the round's wall time, in MB/s.

The task is a NumPy model of TENSORS float32 tensors whose training adds a constant,
so the time measured is fedloom's: transport, checksums, streaming aggregation.
Results go to bench/results/grpc_large_model.json. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from fedloom.deployment.launcher import start_aggregator, start_collaborator
from fedloom.pki import provision

ROOT = Path(__file__).resolve().parents[1]

TASK = """
import numpy as np
from fedloom import EvalOutput, TrainOutput, SiteData

SIZES = {sizes!r}


class Large:
    def init_weights(self, seed):
        return {{f"layer{{i:02d}}": np.zeros(n, np.float32) for i, n in enumerate(SIZES)}}

    def train(self, weights, data, settings, context):
        return TrainOutput({{k: v + np.float32(1e-3) for k, v in weights.items()}}, 100, {{}})

    def evaluate(self, weights, x, y):
        return EvalOutput(1, {{"accuracy": 1.0}})

    def load_data(self, context):
        empty = np.zeros((1, 1), np.float32)
        return SiteData(empty, np.zeros(1, np.int64), empty, np.zeros(1, np.int64))


task = Large()
"""

PLAN = """version: 1
name: large-model
task: task.py
seed: 0
rounds: 1
sites: {sites}
data:
  dataset: custom
strategy:
  name: fedavg
evaluation:
  final: false
deadline:
  round_seconds: 1800
"""


def peak_rss(pid: int) -> int:
    """VmHWM of ``pid`` in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


class PeakWatcher:
    """Reads each process's VmHWM every 50 ms; keeps the last value seen (it only grows)."""

    def __init__(self, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        self.procs = procs
        self.peaks = dict.fromkeys(procs, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, proc in self.procs.items():
                self.peaks[name] = max(self.peaks[name], peak_rss(proc.pid))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "grpc_large_model.json"
    )
    args = parser.parse_args()

    total = int(args.gib * 2**30) // 4
    sizes = [total // args.tensors] * args.tensors
    sizes[-1] += total - sum(sizes)
    model_bytes = 4 * total
    work = Path(tempfile.mkdtemp(prefix="fedloom-large-"))
    ws = work / "ws"
    ws.mkdir()
    (ws / "task.py").write_text(TASK.format(sizes=sizes))
    (ws / "federation.yaml").write_text(PLAN.format(sites=args.sites))
    names = [f"site-{i:02d}" for i in range(1, args.sites + 1)]
    provision(ws, names)
    env = {**os.environ, "NO_COLOR": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        aggregator, port = start_aggregator(ws, [], "--run-name", "large", "--quiet", env=env)
        procs["aggregator"] = aggregator
        if port is None:
            raise SystemExit(f"the aggregator did not start (exit {aggregator.wait()})")
        for name in names:
            procs[name] = start_collaborator(
                ws, [], name, port, "--give-up-after", "120", env=env, stdout=subprocess.DEVNULL
            )
        watcher = PeakWatcher(procs)
        started = time.perf_counter()
        code = aggregator.wait()
        wall = time.perf_counter() - started
        for name in names:
            procs[name].wait(timeout=120)
        peaks = watcher.stop()
        if code != 0:
            raise SystemExit(f"aggregator exited with {code}")
        summary = json.loads((ws / "runs" / "large" / "summary.json").read_text())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)  # the workspace holds a GiB-sized final model
    moved = summary["bytes_sent"] + summary["bytes_received"]
    round_seconds = summary["wall_seconds"]
    result = {
        "model_bytes": model_bytes,
        "tensors": args.tensors,
        "sites": args.sites,
        "aggregator_peak_rss_bytes": peaks["aggregator"],
        "aggregator_peak_over_model": peaks["aggregator"] / model_bytes,
        "site_peak_rss_bytes": {n: peaks[n] for n in names},
        "bytes_moved": moved,
        "round_seconds": round_seconds,
        "throughput_mb_per_s": moved / round_seconds / 1e6,
        "process_wall_seconds": wall,
        "failures": summary["failures"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
