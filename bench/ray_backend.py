"""The digits federation on the Ray backend against the default one: same accuracy?

    .venv/bin/python bench/ray_backend.py [--sites 8] [--rounds 30]

Makes the digits template workspace in a temporary folder and runs ``fedloom simulate``
twice as real commands: with the default backend (worker processes) and with
``--backend ray`` (no address: fedloom starts a local Ray instance and stops it at the
end). Writes the final test accuracy and wall seconds of each to
bench/results/ray_backend.json. Needs ``pip install -e '.[torch,ray]'``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "ray_backend.json"


def simulate(ws: Path, name: str, extra: list[str], sites: int, rounds: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "fedloom.cli", "simulate", str(ws), "--sites", str(sites),
        "--rounds", str(rounds), "--run-name", name, "--quiet", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((ws / "runs" / name / "summary.json").read_text())
    return {"accuracy": summary["test_accuracy"], "seconds": took}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedloom-ray-bench-") as tmp:
        ws = Path(tmp) / "digits"
        subprocess.run(
            [sys.executable, "-m", "fedloom.cli", "init", str(ws), "--template", "digits"],
            check=True,
            capture_output=True,
        )
        default = simulate(ws, "default", [], args.sites, args.rounds)
        ray = simulate(ws, "ray", ["--backend", "ray"], args.sites, args.rounds)
    result = {
        "workload": (
            f"The digits template ({args.sites} sites, {args.rounds} rounds, its plan's "
            "dirichlet:0.3 partition and seed), `fedloom simulate` with the default backend "
            "and with `--backend ray` on a local Ray instance; wall seconds include start-up."
        ),
        "default_accuracy": default["accuracy"],
        "default_seconds": default["seconds"],
        "ray_accuracy": ray["accuracy"],
        "ray_seconds": ray["seconds"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"default backend: accuracy {default['accuracy']:.4f} ({default['seconds']:.1f} s); "
        f"ray: {ray['accuracy']:.4f} ({ray['seconds']:.1f} s)"
    )


if __name__ == "__main__":
    main()
