"""A model of GIB gibibytes through one FedAvg round over gRPC with mutual TLS.

    python bench/grpc_large_model.py [--gib 1.0] [--tensors 16] [--sites 2]
                                     [--dtype float32|bfloat16] [--compare]

Starts a real aggregator and SITES collaborators as OS processes on loopback (the
workspace's PKI made by fedloom's own code), runs one training round with no
evaluation, and reports:

- the aggregator's peak resident memory (VmHWM from /proc, read while it runs and just
  before it exits), as bytes and as a multiple of the model's bytes;
- each collaborator's peak resident memory;
- the round's transfer throughput: bytes moved (model down to every site, updates up)
  over the round's wall time, in MB/s.

The task is a NumPy model of TENSORS tensors of DTYPE whose training adds a small
number that differs by site and element, so the time measured is fedloom's: transport,
checksums, streaming aggregation. With ``--compare`` the same round also runs in process
(``fedloom simulate``) and the two final models are compared byte for byte.
Results go to bench/results/grpc_large_model[-DTYPE].json. Linux only (reads /proc).
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
import ml_dtypes
import numpy as np
from fedloom import EvalOutput, TrainOutput, SiteData

SIZES = {sizes!r}
DTYPE = np.dtype({dtype!r}) if {dtype!r} != "bfloat16" else np.dtype(ml_dtypes.bfloat16)


class Large:
    def init_weights(self, seed):
        return {{f"layer{{i:02d}}": np.zeros(n, DTYPE) for i, n in enumerate(SIZES)}}

    def train(self, weights, data, settings, context):
        # a step of 1e-3 times a pattern of 1..16 that differs by site: the mean is
        # not any one site's update
        trained = {{}}
        for k, v in weights.items():
            step = (np.arange(v.size, dtype=np.float32) % 16 + 1 + context.index) * 1e-3
            trained[k] = (v.astype(np.float32) + step).astype(DTYPE)
        return TrainOutput(trained, 100 + 50 * context.index, {{}})

    def evaluate(self, weights, data, context):
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
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compare", action="store_true", help="also run it in process")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    out = args.out or ROOT / "bench" / "results" / f"grpc_large_model{suffix}.json"

    itemsize = 4 if args.dtype == "float32" else 2
    total = int(args.gib * 2**30) // itemsize
    sizes = [total // args.tensors] * args.tensors
    sizes[-1] += total - sum(sizes)
    model_bytes = itemsize * total
    work = Path(tempfile.mkdtemp(prefix="fedloom-large-"))
    ws = work / "ws"
    ws.mkdir()
    (ws / "task.py").write_text(TASK.format(sizes=sizes, dtype=args.dtype))
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
        identical = _same_as_in_process(ws) if args.compare else None
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
        "dtype": args.dtype,
        "final_model_identical_to_in_process": identical,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _same_as_in_process(ws: Path) -> bool:
    """Whether ``fedloom simulate`` of the same plan ends with the same final model file
    bytes as the gRPC run."""
    import sys

    done = subprocess.run(  # noqa: S603 - our own command
        [
            sys.executable,
            "-m",
            "fedloom.cli",
            "simulate",
            str(ws),
            "--run-name",
            "inprocess",
            "--workers",
            "1",
            "--quiet",
        ],
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the in-process run failed (exit {done.returncode})")
    runs = ws / "runs"
    from fedloom.store import load_weights

    grpc_final = load_weights(runs / "large" / "final.safetensors")
    local = load_weights(runs / "inprocess" / "final.safetensors")
    return list(grpc_final) == list(local) and all(
        grpc_final[k].dtype == local[k].dtype and grpc_final[k].tobytes() == local[k].tobytes()
        for k in local
    )


if __name__ == "__main__":
    main()
