"""Bytes on the wire per round with and without a LoRA adapter: the llm-lora template.

    python bench/lora_bytes.py [--rounds 3]

Makes the ``llm-lora`` workspace (``fedloom init``), then runs ``fedloom simulate`` on it
twice: as the template is (``model.federated: trainable``: only the adapter travels) and
with ``model.federated=all``: the same LoRA training, but every tensor travels, the
frozen base included, as with a framework that ships the whole model each round.
Every message goes through the wire format (``--roundtrip``). Writes each run's bytes
per round (sent to the sites and received from them), the federated bytes against the
whole model's, and the final test perplexity to bench/results/lora_bytes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEDLOOM = [sys.executable, "-m", "fedloom.cli"]


def run(*args: str) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    done = subprocess.run([*FEDLOOM, *args], env=env, check=False)  # noqa: S603 - ours
    if done.returncode != 0:
        raise SystemExit(f"fedloom {' '.join(args)} failed (exit {done.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_bytes.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedloom-lora-"))
    try:
        ws = work / "lm"
        run("init", str(ws), "--template", "llm-lora")
        runs = {}
        for name, overrides in (("adapter", []), ("whole-model", ["model.federated=all"])):
            run(
                "simulate", str(ws), f"rounds={args.rounds}", *overrides,
                "--run-name", name, "--roundtrip", "--quiet",
            )  # fmt: skip
            summary = json.loads((ws / "runs" / name / "summary.json").read_text())
            rounds = summary["rounds_finished"] + 1  # the final evaluation sends the model too
            runs[name] = {
                "bytes_sent_per_round": summary["bytes_sent"] / rounds,
                "bytes_received_per_round": summary["bytes_received"] / max(1, rounds - 1),
                "federated_bytes": summary["federated_bytes"],
                "model_bytes": summary["model_bytes"],
                "test_perplexity": summary["test_perplexity"],
                "sites": summary["sites"],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "workload": f"the llm-lora template (4 sites), {args.rounds} rounds, --roundtrip",
        "runs": runs,
        "sent_ratio_whole_over_adapter": runs["whole-model"]["bytes_sent_per_round"]
        / runs["adapter"]["bytes_sent_per_round"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
