"""Chaos: a 10-round federation over gRPC on loopback whose processes are SIGKILLed at
named fault points, restarted each time, and must end bit-identical to a run that was
never interrupted.

The aggregator is killed (``--fault POINT@ROUND[:INDEX]``, through the injectable fault
points, never by timing) while it waits for answers, mid-download, mid-upload,
mid-aggregation, between writing its state and renaming it into place, and after
aggregating; each time it is restarted on the same port and resumes by itself.
Collaborators are killed mid-upload and restarted. The reference is the same plan run
in-process without interruption.

Run it alone: ``python tests/chaos.py [FOLDER]``; ``tests/test_chaos.py`` runs it in
the suite and checks the result.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from workspaces import PADDED_TASK

from fedloom.deployment import launcher
from fedloom.pki import provision
from fedloom.store import load_weights
from fedloom.templates import create_workspace

SITES = ("site-01", "site-02", "site-03")
ROUNDS = 10
PLAN = [
    "sites=3",
    f"rounds={ROUNDS}",
    "deadline.round_seconds=300",  # never reached: no close here depends on timing
    "deadline.min_fraction=1.0",
]

# Each restart of the aggregator gets the next one; the last start has none.
AGGREGATOR_FAULTS = (
    ("round.waiting@2", 2),  # waiting for the sites' answers
    ("download.chunk@3:1", 3),  # between the two chunks of a site's download
    ("upload.chunk@4:1", 4),  # after folding the second chunk of an upload
    ("round.aggregating@5", 5),  # the sum taken, the strategy's step not yet
    ("state.written@6", 6),  # the checkpoint written and fsynced, not yet renamed
    ("round.aggregated@8", 8),  # the new model made, not yet persisted
)
# Each site's successive starts; a site restarted after its last fault runs without one.
SITE_FAULTS = {
    "site-01": ("site.upload.chunk@1:1", "site.upload.chunk@7:0"),
    "site-02": ("site.upload.chunk@3:1", "site.upload.chunk@9:1"),
    "site-03": ("site.upload.chunk@5:0",),
}
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}


@dataclass
class ChaosResult:
    workspace: Path
    aggregator_kills: list[str] = field(default_factory=list)
    site_kills: list[str] = field(default_factory=list)
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    final: dict[str, np.ndarray] = field(default_factory=dict)
    attempts: list[tuple[int, int, str, str | None, int]] = field(default_factory=list)
    seconds: float = 0.0

    def bit_identical(self) -> bool:
        return list(self.final) == list(self.reference) and all(
            self.final[k].dtype == self.reference[k].dtype
            and self.final[k].tobytes() == self.reference[k].tobytes()
            for k in self.reference
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_chaos_workspace(root: Path) -> Path:
    ws = create_workspace(root / "chaos", "breast-cancer")
    (ws / "task.py").write_text(PADDED_TASK)  # two 4 MiB chunks each way
    provision(ws, list(SITES))
    return ws


def run_reference(ws: Path) -> dict[str, np.ndarray]:
    """The same plan, uninterrupted, in-process (the gRPC run is bit-identical to it:
    tests/test_deploy.py)."""
    done = subprocess.run(  # noqa: S603 - our own command
        launcher.fedloom_command(
            "simulate", str(ws), *PLAN, "--run-name", "reference", "--quiet", "--workers", "1"
        ),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{done.stdout}\n{done.stderr}")
    return load_weights(ws / "runs" / "reference" / "final.safetensors")


def run_chaos(ws: Path, *, timeout: float = 900) -> ChaosResult:
    result = ChaosResult(ws)
    started = time.monotonic()
    port = free_port()
    logs = ws / "chaos-logs"
    logs.mkdir(exist_ok=True)
    agg_faults = list(AGGREGATOR_FAULTS)
    site_faults = {s: list(f) for s, f in SITE_FAULTS.items()}
    starts: Counter[str] = Counter()

    def start_aggregator(first: bool) -> subprocess.Popen[bytes]:
        extra = ["--run-name", "chaos"] if first else []
        if agg_faults:
            extra += ["--fault", agg_faults[0][0]]
        extra += ["--quiet", "--dead-after", "600"]
        starts["aggregator"] += 1
        out = open(logs / f"aggregator-{starts['aggregator']}.out", "wb")  # noqa: SIM115
        proc, bound = launcher.start_aggregator(
            ws, PLAN, *extra, port=port, env=ENV, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        if bound is None:
            proc.wait()
            raise RuntimeError(f"the aggregator did not start; see {out.name}")
        return proc

    def start_site(site: str) -> subprocess.Popen[bytes]:
        extra = ["--give-up-after", "300"]
        if site_faults[site]:
            extra += ["--fault", site_faults[site][0]]
        starts[site] += 1
        out = open(logs / f"{site}-{starts[site]}.out", "wb")  # noqa: SIM115
        proc = launcher.start_collaborator(
            ws, PLAN, site, port, *extra, env=ENV, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        return proc

    aggregator = start_aggregator(first=True)
    sites = {s: start_site(s) for s in SITES}
    finished: set[str] = set()
    try:
        while aggregator is not None or len(finished) < len(SITES):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"chaos run still going after {timeout} s; see {logs}")
            if aggregator is not None and (code := aggregator.poll()) is not None:
                if code == -9 and agg_faults:
                    result.aggregator_kills.append(agg_faults.pop(0)[0])
                    aggregator = start_aggregator(first=False)
                elif code == 0:
                    aggregator = None
                else:
                    raise RuntimeError(f"the aggregator exited {code}; see {logs}")
            for site, proc in list(sites.items()):
                if site in finished or (code := proc.poll()) is None:
                    continue
                if code == -9 and site_faults[site]:
                    result.site_kills.append(f"{site} {site_faults[site].pop(0)}")
                    sites[site] = start_site(site)
                elif code == 0:
                    finished.add(site)
                else:
                    raise RuntimeError(f"{site} exited {code}; see {logs}")
            time.sleep(0.1)
    finally:
        for proc in (aggregator, *sites.values()):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    result.seconds = time.monotonic() - started
    result.final = load_weights(ws / "runs" / "chaos" / "final.safetensors")
    with sqlite3.connect(ws / "aggregator" / "state.db") as db:
        result.attempts = db.execute(
            "SELECT round, attempt, kind, close_reason, checkpoint IS NOT NULL "
            "FROM attempts WHERE superseded = 0 ORDER BY round, attempt"
        ).fetchall()
    return result


def main(root: Path) -> int:
    ws = make_chaos_workspace(root)
    reference = run_reference(ws)
    result = run_chaos(ws)
    result.reference = reference
    print(
        json.dumps(
            {
                "aggregator_kills": result.aggregator_kills,
                "site_kills": result.site_kills,
                "bit_identical": result.bit_identical(),
                "attempts": result.attempts,
                "seconds": round(result.seconds, 1),
            },
            indent=1,
        )
    )
    return 0 if result.bit_identical() else 1


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="chaos-"))
    sys.exit(main(folder))
