"""Late kills: a federation over gRPC on loopback whose aggregator is SIGKILLed at a
random moment 0.3-3 s after its final evaluation closed (as issue 14 measured it), then
started once more. Counts the tries whose run folder then has final.safetensors
(byte for byte the uninterrupted run's) and a summary.json that says completed.

Run it alone: ``python tests/late_kill.py [TRIES] [FOLDER]``. Timing decides only when
the kill lands, never whether a try passes; ``tests/test_durability.py`` kills at fault
points instead.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chaos import ENV, free_port

from fedloom.deployment import launcher
from fedloom.pki import provision
from fedloom.templates import create_workspace

PLAN = ["sites=2", "rounds=2", "deadline.round_seconds=300"]
SITES = ("site-01", "site-02")


def evaluated(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and '"kind": "evaluate"' in path.read_text()


def one_try(root: Path, n: int, reference: bytes, rng: random.Random) -> dict[str, object]:
    ws = create_workspace(root / f"try-{n}", "breast-cancer")
    provision(ws, list(SITES))
    port = free_port()
    agg, bound = launcher.start_aggregator(
        ws, PLAN, "--run-name", "run", "--quiet", port=port, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert bound == port
    sites = [
        launcher.start_collaborator(
            ws,
            PLAN,
            s,
            port,
            "--give-up-after",
            "60",
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for s in SITES
    ]
    run_dir = ws / "runs" / "run"
    while not evaluated(run_dir) and agg.poll() is None:
        time.sleep(0.01)
    delay = rng.uniform(0.3, 3.0)
    time.sleep(delay)
    killed = agg.poll() is None
    if killed:
        agg.send_signal(signal.SIGKILL)
    agg.wait()
    for proc in sites:
        proc.kill()
        proc.wait()
    before = sorted(p.name for p in run_dir.iterdir())
    again, _ = launcher.start_aggregator(
        ws, PLAN, "--quiet", port=port, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    again.terminate()
    again.wait()
    final = run_dir / "final.safetensors"
    summary = run_dir / "summary.json"
    ok = (
        final.exists()
        and final.read_bytes() == reference
        and summary.exists()
        and json.loads(summary.read_text()).get("status") == "completed"
    )
    return {"delay": round(delay, 2), "killed": killed, "before": before, "ok": ok}


def main(tries: int, root: Path) -> int:
    rng = random.Random(14)
    ref_ws = create_workspace(root / "reference", "breast-cancer")
    done = subprocess.run(  # noqa: S603 - our own command
        launcher.fedloom_command("simulate", str(ref_ws), *PLAN, "--run-name", "ref", "--quiet"),
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        return 1
    reference = (ref_ws / "runs" / "ref" / "final.safetensors").read_bytes()
    results = [one_try(root, n, reference, rng) for n in range(tries)]
    for r in results:
        print(json.dumps(r))
    good = sum(1 for r in results if r["ok"])
    print(
        f"{good} of {tries} tries: final.safetensors (bit-identical) and summary.json "
        "after one restart"
    )
    return 0 if good == tries else 1


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    folder = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="late-kill-"))
    os.environ.setdefault("COLUMNS", "120")
    sys.exit(main(count, folder))
