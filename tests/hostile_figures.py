"""The figures of issue 14 (points 2 and 3), measured on a real federation: the
aggregator and two honest sites as OS processes on loopback, site-03 this script,
holding site-03's real certificate.

site-03 answers round 1 with 500,000 metric keys, sends five failure reports of 60 MB
for round 2, then one of 900,000 characters that carries a forged log line. The script
prints what the aggregator took, and how much its state database and its log grew.

Run it alone: ``python tests/hostile_figures.py [FOLDER]`` (``HOSTILE_SKIP_60MB=1``
leaves out the five 60 MB reports: against an aggregator that logs them whole, they
write 300 MB of log). Nothing here is a test; ``tests/test_hostile_site.py`` holds them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from test_deploy import finish, kill_leftovers, start_aggregator, start_site
from workspaces import make_workspace

from fedloom.core.records import Instruction
from fedloom.core.weights import specs_of
from fedloom.pki import provision, site_credentials
from fedloom.plan import load_plan, plan_hash
from fedloom.transport import FailureReport, UpdateHeader, iter_chunks
from fedloom.transport.grpc import ClientSettings, GrpcConnection
from fedloom.transport.messages import assemble

FORGED = "1999-01-01 00:00:00,000 INFO fedloom.aggregator: round 2: update from site-02 accepted"


def main(root: Path) -> int:
    ws = make_workspace(root, "breast-cancer")
    overrides = ["sites=3", "rounds=2", "deadline.min_fraction=0.6", "deadline.round_seconds=300"]
    provision(ws, ["site-01", "site-02", "site-03"])
    plan = load_plan(ws, overrides)
    aggregator, port = start_aggregator(ws, overrides, "figures", "--dead-after", "600")
    sites = [start_site(ws, overrides, s, port) for s in ("site-01", "site-02")]
    settings = ClientSettings(
        address=f"127.0.0.1:{port}", site="site-03", plan_hash=plan_hash(plan, ws)
    )
    hostile = GrpcConnection(site_credentials(ws / "sites" / "site-03"), settings)
    state = ws / "aggregator"
    log = state / "aggregator.log"

    def task(round: int) -> Instruction:
        while True:
            got = hostile.get_instruction(timeout=10)
            if got is not None and got.round == round:
                return got

    try:
        hostile.open()
        first = task(1)
        stream = hostile.download(1)
        delta = {
            k: np.zeros_like(v) for k, v in assemble(stream.header.tensors, stream.chunks).items()
        }
        metrics = {f"a-metric-with-a-rather-long-name-number-{i:06d}": 0.5 for i in range(500_000)}
        header = UpdateHeader(1, 100, specs_of(delta), metrics, first.attempt_id)
        receipt = hostile.upload(header, iter_chunks(delta))
        print(f"500,000 metric keys: accepted {receipt.accepted} {receipt.reason[:140]}")
        second = task(2)
        size, start = log.stat().st_size, time.monotonic()
        for _ in range(0 if os.environ.get("HOSTILE_SKIP_60MB") else 5):
            try:
                hostile.report_failure(FailureReport(2, "R" * 60_000_000, second.attempt_id))
                print("a 60 MB reason: taken")
            except Exception as err:  # noqa: BLE001 - a refusal is what is measured
                print(f"a 60 MB reason: refused, {str(err)[:140]}")
        grown = log.stat().st_size - size
        print(f"the log grew by {grown} bytes in {time.monotonic() - start:.1f} s")
        size = log.stat().st_size
        reason = "out of memory\n" + FORGED + "\n" + "z" * 900_000
        hostile.report_failure(FailureReport(2, reason, second.attempt_id))
        grown = log.stat().st_size - size
        print(f"a 900,000-character reason with a forged line: the log grew by {grown} bytes")
        hostile.report_failure(FailureReport(3, "no data", task(3).attempt_id))
        finish(aggregator, sites)
    finally:
        hostile.close()
        kill_leftovers(aggregator, *sites)
    db = sum(f.stat().st_size for f in state.glob("state.db*"))
    forged = [line for line in log.read_text().splitlines() if line.startswith(FORGED[:10])]
    print(f"state.db after the run: {db} bytes; log lines that start as the forgery: {len(forged)}")
    return 0


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="hostile-"))
    sys.exit(main(folder))
