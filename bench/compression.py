"""Bytes on the wire against accuracy: the digits demo federation once per codec.

    python bench/compression.py [--sites 8] [--rounds 30] [--partition dirichlet:0.3]
                                [--seeds 0 1 2] [--model none float16]

Runs the digits template (a 64-128-10 torch MLP, 9.6k parameters) in simulation, every
message through the wire format (``roundtrip``: the bytes counted are protobuf
messages, as gRPC would carry them), for each update codec (none, float16, bfloat16,
int8, topk at fractions 0.1 and 0.01, zstd) and each ``--model`` codec of the global
model's download, once per ``--seeds`` seed (runs are deterministic for a seed). Reports
the bytes the sites uploaded and downloaded, the upload and total compression ratios
against no compression, and the final test accuracy (mean over the seeds) with its
difference from no compression in points. Results go to bench/results/compression.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedloom.plan import load_plan
from fedloom.simulation.options import SimulationOptions
from fedloom.simulation.run import simulate
from fedloom.templates import create_workspace

ROOT = Path(__file__).resolve().parents[1]
CODECS: list[tuple[str, list[str]]] = [
    ("none", []),
    ("float16", ["compression.update=float16"]),
    ("bfloat16", ["compression.update=bfloat16"]),
    ("int8", ["compression.update=int8"]),
    ("topk 0.1", ["compression.update=topk", "compression.topk_fraction=0.1"]),
    ("topk 0.01", ["compression.update=topk", "compression.topk_fraction=0.01"]),
    ("zstd", ["compression.update=zstd"]),
]


def one_run(ws: Path, overrides: list[str]) -> dict[str, Any]:
    plan = load_plan(ws, overrides)
    started = time.perf_counter()
    result = simulate(ws, plan, SimulationOptions(workers=0, roundtrip=True))
    failures = sum(len(r.failures) for r in result.history)
    return {
        "test_accuracy": result.test_metrics["accuracy"],
        "upload_bytes": result.bytes_received,  # sites -> aggregator
        "download_bytes": result.bytes_sent,  # aggregator -> sites
        "failures": failures,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--partition", default="dirichlet:0.3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", nargs="+", default=["none", "float16"])
    args = parser.parse_args()
    base = [f"sites={args.sites}", f"rounds={args.rounds}", f"data.partition={args.partition}"]
    results: dict[str, Any] = {
        "workload": "digits template, fedavg",
        "sites": args.sites,
        "rounds": args.rounds,
        "partition": args.partition,
        "seeds": args.seeds,
        "rows": [],
    }
    rows: list[dict[str, Any]] = results["rows"]
    with tempfile.TemporaryDirectory(prefix="fedloom-compression-") as tmp:
        ws = create_workspace(Path(tmp) / "digits", "digits")
        for model in args.model:
            for label, extra in CODECS:
                runs = [
                    one_run(ws, [*base, f"seed={s}", f"compression.model={model}", *extra])
                    for s in args.seeds
                ]
                rows.append(
                    {
                        "update": label,
                        "model": model,
                        "test_accuracy": statistics.mean(r["test_accuracy"] for r in runs),
                        "test_accuracy_by_seed": [r["test_accuracy"] for r in runs],
                        "upload_bytes": runs[0]["upload_bytes"],  # the same for every seed
                        "download_bytes": runs[0]["download_bytes"],
                        "failures": sum(r["failures"] for r in runs),
                        "seconds": statistics.mean(r["seconds"] for r in runs),
                    }
                )
                print(f"  ran {label} (model {model})", flush=True)
    plain = rows[0]
    for row in rows:
        row["accuracy_delta_points"] = 100 * (row["test_accuracy"] - plain["test_accuracy"])
        row["upload_ratio"] = plain["upload_bytes"] / row["upload_bytes"]
        total = row["upload_bytes"] + row["download_bytes"]
        row["total_ratio"] = (plain["upload_bytes"] + plain["download_bytes"]) / total
    print(table(rows))
    out = ROOT / "bench" / "results" / "compression.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| update | model | upload bytes | download bytes | upload ratio | total ratio "
        "| accuracy | delta (points) |"
    )
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['update']} | {r['model']} | {r['upload_bytes']:,} | {r['download_bytes']:,} "
            f"| {r['upload_ratio']:.2f}x | {r['total_ratio']:.2f}x | {r['test_accuracy']:.4f} "
            f"| {r['accuracy_delta_points']:+.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
