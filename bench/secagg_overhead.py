"""What secure aggregation costs a round: 10 sites, a model of 1M float32 parameters.

    python bench/secagg_overhead.py [--sites 10] [--params 1000000] [--rounds 5]
                                    [--transport inprocess|grpc|both]

The same workload runs three ways: plain FedAvg, secure aggregation in the 32-bit ring
and in the 64-bit ring. Sites do no training (their update is a fixed random array), so
what is timed is fedloom's: the key and share exchange, encoding and masking at each
site (ChaCha20 keystreams), the masked sum and the unmasking at the aggregator.

- ``inprocess``: one process, the in-process transport with its wire round trip (every
  message serialised as gRPC would), sites as threads. A round is timed from its opening
  to its close (after unmasking), the median over the rounds.
- ``grpc``: ``fedloom simulate --transport grpc``: a real aggregator and one collaborator
  process per site, mutual TLS on loopback; the aggregator's seconds per round.

Reports seconds per round, the ratio to plain FedAvg, and the bytes each site sent per
round. Results go to bench/results/secagg_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.aggregator import Aggregator, FederationConfig
from fedloom.collaborator import Collaborator
from fedloom.core.events import RoundClosed, RoundOpened
from fedloom.core.records import Instruction, InstructionKind, SiteAnswer
from fedloom.core.weights import Weights
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.settings import PrivacyPlan, SecureAggregationPlan
from fedloom.privacy.site import SitePrivacy
from fedloom.strategies import FedAvg
from fedloom.transport import InProcessTransport

ROOT = Path(__file__).resolve().parents[1]
# mode -> (ring bits, neighbours); None bits: plain FedAvg; None neighbours: every site
MODES: dict[str, tuple[int | None, int | None]] = {
    "plain": (None, None),
    "secagg-32": (32, None),
    "secagg-64": (64, None),
    "secagg-32-k4": (32, 4),  # SecAgg+'s sparse graph: masks with 4 neighbours
}

TASK = """
import numpy as np
from fedloom import EvalOutput, SiteData, TrainOutput

SIZES = {sizes!r}


class Fixed:
    def init_weights(self, seed):
        return {{f"t{{i}}": np.zeros(n, np.float32) for i, n in enumerate(SIZES)}}

    def train(self, weights, data, settings, context):
        rng = np.random.default_rng(context.index)
        return TrainOutput(
            {{k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in weights.items()}},
            100,
            {{}},
        )

    def evaluate(self, weights, x, y):
        return EvalOutput(1, {{"accuracy": 1.0}})

    def load_data(self, context):
        empty = np.zeros((1, 1), np.float32)
        return SiteData(empty, np.zeros(1, np.int64), empty, np.zeros(1, np.int64))


task = Fixed()
"""


def sizes_of(params: int) -> list[int]:
    """Four tensors adding up to ``params``."""
    quarter = params // 4
    return [quarter, quarter, quarter, params - 3 * quarter]


def secagg_plan(bits: int | None, neighbours: int | None) -> PrivacyPlan:
    if bits is None:
        return PrivacyPlan()
    return PrivacyPlan(
        secure_aggregation=SecureAggregationPlan(bits=bits, neighbours=neighbours)  # type: ignore[arg-type]
    )


def inprocess_round_seconds(
    sites: int, params: int, rounds: int, bits: int | None, neighbours: int | None
) -> dict[str, Any]:
    roster = tuple(f"site-{i:02d}" for i in range(1, sites + 1))
    plan = secagg_plan(bits, neighbours)
    model = {f"t{i}": np.zeros(n, np.float32) for i, n in enumerate(sizes_of(params))}
    config = FederationConfig(
        roster=roster,
        rounds=rounds,
        sites_per_round=sites,
        min_fraction=1.0,
        round_deadline=600.0,
        max_samples=100,
        final_evaluation=False,
    )
    opened: dict[int, float] = {}
    took: list[float] = []

    def on_event(event: Any) -> None:
        if isinstance(event, RoundOpened):
            opened[event.round] = time.perf_counter()
        elif isinstance(event, RoundClosed):
            took.append(time.perf_counter() - opened[event.record.round])

    privacy = AggregatorPrivacy(plan, per_round=sites, max_samples=100) if bits else None
    aggregator = Aggregator(config, FedAvg(), model, on_event=on_event, privacy=privacy)
    transport = InProcessTransport(aggregator, roundtrip=True)
    updates = {
        site: {
            k: np.random.default_rng(i).normal(0, 0.01, v.shape).astype(np.float32)
            for k, v in model.items()
        }
        for i, site in enumerate(roster)
    }

    def runner(site: str) -> Any:
        def run(instruction: Instruction, weights: Weights) -> SiteAnswer:
            if instruction.kind is InstructionKind.EVALUATE:
                return SiteAnswer(100, {}, None)
            return SiteAnswer(100, {}, updates[site])

        return run

    spent: dict[str, list[float]] = {"site_protect": [], "aggregator_unmask": []}

    def timed(kind: str, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[kind].append(time.perf_counter() - started)

        return call

    site_privacies = {}
    for site in roster:
        if bits:
            p = SitePrivacy(site, plan, per_round=sites, max_samples=100)
            p.protect = timed("site_protect", p.protect)  # type: ignore[method-assign]
            site_privacies[site] = p
    if privacy is not None:
        privacy.unmasked_summary = timed(  # type: ignore[method-assign]
            "aggregator_unmask", privacy.unmasked_summary
        )
    collaborators = [
        Collaborator(transport.connect(site), runner(site), privacy=site_privacies.get(site))
        for site in roster
    ]
    threads = [threading.Thread(target=c.run, daemon=True) for c in collaborators]
    for t in threads:
        t.start()
    aggregator.run()
    for t in threads:
        t.join(timeout=60)
    received = transport.traffic.received
    return {
        "seconds_per_round": statistics.median(took),
        "rounds_seconds": took,
        "bytes_up_per_site_round": received / (sites * rounds),
        # clip, encode and mask one update at one site (all sites share 2 cores here)
        "site_protect_seconds_median": statistics.median(spent["site_protect"])
        if spent["site_protect"]
        else 0.0,
        # remove the masks from the sum and decode it, once a round
        "aggregator_unmask_seconds_median": statistics.median(spent["aggregator_unmask"])
        if spent["aggregator_unmask"]
        else 0.0,
    }


def grpc_round_seconds(
    sites: int, params: int, rounds: int, bits: int | None, neighbours: int | None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedloom-secagg-bench-") as tmp:
        ws = Path(tmp) / "ws"
        ws.mkdir()
        (ws / "task.py").write_text(TASK.format(sizes=sizes_of(params)))
        (ws / "federation.yaml").write_text(
            f"name: secagg-bench\nrounds: {rounds}\nsites: {sites}\n"
            "data: {dataset: custom}\ntraining: {max_samples: 100}\nevaluation: {final: false}\n"
        )
        overrides = [f"privacy.secure_aggregation.bits={bits}"] if bits else []
        if bits and neighbours:
            overrides.append(f"privacy.secure_aggregation.neighbours={neighbours}")
        cmd = [
            sys.executable, "-m", "fedloom.cli", "simulate", str(ws), "--transport", "grpc",
            "--run-name", "bench", "--quiet", *overrides,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"simulate failed ({done.returncode}): {done.stderr[-2000:]}")
        summary = json.loads((ws / "runs" / "bench" / "summary.json").read_text())
        with sqlite3.connect(ws / "aggregator" / "state.db") as db:
            took = [
                closed - opened
                for opened, closed in db.execute(
                    "SELECT opened, closed FROM attempts WHERE kind = 'train' ORDER BY round"
                )
            ]
        return {
            # each round from its opening to its close, as the aggregator recorded them
            # (the first includes the collaborators' start-up: the median leaves it out)
            "seconds_per_round": statistics.median(took),
            "rounds_seconds": took,
            "bytes_up_per_site_round": summary["bytes_received"] / (sites * rounds),
        }


def one_site_alone(sites: int, params: int) -> dict[str, float]:
    """What masking costs one site on one core, and unmasking the aggregator, from the
    pieces: encoding ``params`` values, one ChaCha20 mask of that size (a site adds one
    per neighbour plus its own; the aggregator removes one per survivor)."""
    from fedloom.privacy.masking import mask_slice
    from fedloom.privacy.quantize import encode

    values = np.random.default_rng(0).normal(0, 0.01, params)

    def best(fn: Any, repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    out: dict[str, float] = {}
    for bits in (32, 64):
        coded = best(lambda b=bits: encode(values, weight=100, clip_range=1.0, frac=10, bits=b))
        mask = best(lambda b=bits: mask_slice(b"k" * 32, 0, params, b))
        out[f"encode_seconds_{bits}"] = coded
        out[f"mask_seconds_{bits}"] = mask
        out[f"site_seconds_{bits}_all_neighbours"] = coded + sites * mask
        out[f"site_seconds_{bits}_4_neighbours"] = coded + 5 * mask
        out[f"aggregator_unmask_seconds_{bits}_no_dropout"] = sites * mask
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--transport", choices=["inprocess", "grpc", "both"], default="both")
    args = parser.parse_args()
    transports = ["inprocess", "grpc"] if args.transport == "both" else [args.transport]
    results: dict[str, Any] = {
        "sites": args.sites,
        "params": args.params,
        "rounds": args.rounds,
        "machine_cores": __import__("os").cpu_count(),
    }
    results["one_site_alone"] = one_site_alone(args.sites, args.params)
    print(json.dumps({k: round(v, 4) for k, v in results["one_site_alone"].items()}))
    for transport in transports:
        measure = inprocess_round_seconds if transport == "inprocess" else grpc_round_seconds
        table: dict[str, Any] = {}
        for mode, (bits, neighbours) in MODES.items():
            table[mode] = measure(args.sites, args.params, args.rounds, bits, neighbours)
            print(
                f"{transport:9s} {mode:10s} {table[mode]['seconds_per_round']:.3f} s/round",
                flush=True,
            )
        base = table["plain"]["seconds_per_round"]
        for mode in MODES:
            table[mode]["ratio_to_plain"] = table[mode]["seconds_per_round"] / base
            table[mode]["bytes_ratio_to_plain"] = (
                table[mode]["bytes_up_per_site_round"] / table["plain"]["bytes_up_per_site_round"]
            )
        results[transport] = table
    out = ROOT / "bench" / "results" / "secagg_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps(
            {
                t: {m: round(v["ratio_to_plain"], 2) for m, v in results[t].items()}
                for t in transports
            }
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
