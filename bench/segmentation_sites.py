"""The segmentation template: federated test Dice against the centralised baseline and
against each hospital trained alone, all on the same held-out test set (data/test).

- federated: ``simulate`` of the template's plan as it is (``--baseline`` too);
- centralised: the baseline of that run (the pooled training data, rounds x epochs);
- each site alone: the plan restricted to that one site, trained in one go for the same
  rounds x epochs (``sites=[site] rounds=1 epochs=R*E``), like the baseline on its data.

Writes ``bench/results/segmentation_sites.json`` and prints the table::

    .venv/bin/python bench/segmentation_sites.py [--workspace DIR] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedloom import SimulationOptions, create_workspace, load_plan, simulate

RESULTS = Path(__file__).parent / "results" / "segmentation_sites.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workspace", type=Path, help="a segmentation workspace (default: a new one)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="plan overrides, e.g. rounds=12")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedloom-seg-"))
    ws = args.workspace or create_workspace(root / "seg", "segmentation")
    plan = load_plan(ws, list(args.overrides))
    rows: list[dict[str, object]] = []

    started = time.perf_counter()
    both = simulate(ws, plan, SimulationOptions(workers=args.workers, baseline=True))
    wall = time.perf_counter() - started
    central = both.centralized_metrics or {}
    rows.append({"trained": "federated (fedavg)", **both.test_metrics, "seconds": wall})
    rows.append({"trained": "centralised (pooled)", **central})

    epochs = plan.rounds * plan.training.epochs
    for site in plan.roster:
        alone = load_plan(
            ws, [*args.overrides, f"sites=[{site}]", "rounds=1", f"training.epochs={epochs}"]
        )
        t0 = time.perf_counter()
        result = simulate(ws, alone, SimulationOptions(workers=1))
        rows.append(
            {"trained": f"{site} alone", **result.test_metrics, "seconds": time.perf_counter() - t0}
        )

    print(f"{'trained':24} {'test dice':>9} {'test iou':>9} {'seconds':>8}")
    for row in rows:
        seconds = f"{row['seconds']:8.1f}" if "seconds" in row else " " * 8
        print(f"{row['trained']:24} {row['dice']:9.4f} {row['iou']:9.4f} {seconds}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"overrides": args.overrides, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
