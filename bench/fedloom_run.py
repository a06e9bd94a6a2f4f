"""The workload on fedloom.

    python bench/fedloom_run.py --workload JSON --out FILE [--transport inprocess|grpc]
                                [--set KEY=VALUE ...]

``inprocess``: the simulation (``fedloom simulate``'s engine, with the run recorder
writing metrics.jsonl as the command does): the aggregator in this process, the sites'
local work in worker processes, one per core. ``grpc``: ``fedloom simulate --transport
grpc``: the aggregator and one collaborator process per site, mutual TLS on loopback.

The workspace is made in a temporary folder: the workload's MLP as a TorchTask (or, for
no-op sites, a numpy task that returns the model unchanged), scikit-learn's digits split
IID, 1 epoch, evaluation off (``evaluation.each_round`` and ``final`` false). A round is
timed from the previous round's close (the first from its opening) to its close.
``--set`` adds plan overrides (compression, secure aggregation).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/workloads.py
from workloads import TEST_FRACTION, Workload  # noqa: E402

TORCH_TASK = """
from torch import nn

from fedloom.tasks import TorchTask

WIDTHS = {widths!r}


def build_model():
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


task = TorchTask(build_model)
"""

NOOP_TASK = '''
import numpy as np

from fedloom import EvalOutput, TrainOutput

WIDTHS = {widths!r}


class Noop:
    """Sites that do no training: the model goes back unchanged."""

    def init_weights(self, seed):
        rng = np.random.default_rng(seed)
        weights = {{}}
        for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
            weights[f"{{2 * i}}.weight"] = rng.normal(0, 0.1, (b, a)).astype(np.float32)
            weights[f"{{2 * i}}.bias"] = np.zeros(b, np.float32)
        return weights

    def train(self, weights, data, settings, context):
        return TrainOutput(weights, len(data.y_train), {{}})

    def evaluate(self, weights, data, context):
        x, y = data
        return EvalOutput(len(y), {{}})


task = Noop()
'''


def make_workspace(ws: Path, w: Workload) -> None:
    ws.mkdir(parents=True)
    widths = (64, *w.hidden, 10)
    (ws / "task.py").write_text((NOOP_TASK if w.noop else TORCH_TASK).format(widths=widths))
    (ws / "federation.yaml").write_text(
        json.dumps(
            {
                "name": f"bench-{w.name}",
                "task": "task.py",
                "seed": 0,
                "rounds": w.rounds,
                "sites": w.sites,
                "data": {
                    "dataset": "digits",
                    "partition": "iid",
                    "val_fraction": 0.0,
                    "test_fraction": TEST_FRACTION,
                },
                "strategy": {"name": "fedavg"},
                "training": {
                    "epochs": w.epochs,
                    "batch_size": w.batch_size,
                    "lr": w.lr,
                    "momentum": w.momentum,
                },
                "evaluation": {"final": False, "each_round": False},
                "deadline": {"round_seconds": 3600, "min_fraction": 1.0},
            },
            indent=1,
        )
    )


def run_inprocess(ws: Path, w: Workload, overrides: list[str]) -> dict[str, Any]:
    from fedloom.core.events import RoundClosed, RoundOpened
    from fedloom.plan import load_plan
    from fedloom.report import RunRecorder
    from fedloom.simulation.options import SimulationOptions
    from fedloom.simulation.run import simulate

    plan = load_plan(ws, overrides)
    recorder = RunRecorder(ws / "runs" / "bench")
    stamps: list[float] = []

    def on_event(event: Any, traffic: Any) -> None:
        if isinstance(event, RoundOpened) and not stamps:
            stamps.append(time.perf_counter())
        recorder.on_event(event)
        if isinstance(event, RoundClosed):
            stamps.append(time.perf_counter())

    result = simulate(ws, plan, SimulationOptions(), on_event=on_event)
    return {
        "round_seconds": [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=False)],
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        "failures": sum(len(r.failures) for r in result.history),
    }


def run_grpc(ws: Path, w: Workload, overrides: list[str]) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "fedloom.cli", "simulate", str(ws), "--transport", "grpc",
        "--run-name", "bench", "--quiet", *overrides,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"simulate failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads((ws / "runs" / "bench" / "summary.json").read_text())
    with sqlite3.connect(ws / "aggregator" / "state.db") as db:
        rows = list(
            db.execute(
                "SELECT opened, closed FROM attempts WHERE kind = 'train' ORDER BY round, attempt"
            )
        )
        failures = db.execute("SELECT count(*) FROM failures").fetchone()[0]
    stamps = [rows[0][0]] + [closed for _, closed in rows]
    return {
        "round_seconds": [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=False)],
        "bytes_sent": summary.get("bytes_sent"),
        "bytes_received": summary.get("bytes_received"),
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", required=True, help="Workload.to_json() as JSON")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--transport", choices=("inprocess", "grpc"), default="inprocess")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    started = time.perf_counter()
    import fedloom

    w = Workload.from_json(json.loads(args.workload))
    with tempfile.TemporaryDirectory(prefix="fedloom-bench-") as tmp:
        ws = Path(tmp) / "ws"
        make_workspace(ws, w)
        run = run_grpc if args.transport == "grpc" else run_inprocess
        out = run(ws, w, args.overrides)
    result = {
        "framework": "fedloom",
        "version": fedloom.__version__,
        "transport": args.transport,
        "overrides": args.overrides,
        "workload": w.to_json(),
        **out,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.write_text(json.dumps(result, indent=1))
    seconds = sorted(out["round_seconds"])
    print(f"fedloom {w.name} ({args.transport}): median {seconds[len(seconds) // 2]:.4f} s/round")


if __name__ == "__main__":
    main()
