"""``make bench``: the same workloads on the plain loop, fedloom and the peers, side by side.

    .venv/bin/python bench/run.py [--repeats 3] [--only ROW ...] [--skip-peers]

Every row is one workload (bench/workloads.py) on one framework. Each run is its own
OS process; runs alternate between frameworks (floor, fedloom, Flower, OpenFL, then
the reverse order on the next repeat), so a slow spell of the machine hits them all.
For each run: the median seconds per round, and the peak memory as PSS (proportional
set size: shared pages split between the processes that share them) summed over the
run's whole process tree, sampled every 0.2 s from /proc/PID/smaps_rollup. A row's
figure is the median over its repeats.

Raw results (every run) go to bench/results/frameworks.json; ``bench/report.py``
turns them into docs/benchmarks.md and its plot. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/workloads.py
from workloads import LARGE, WORKLOADS, Workload  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "frameworks.json"
PYTHON = {
    "floor": ROOT / ".venv" / "bin" / "python",
    "fedloom": ROOT / ".venv" / "bin" / "python",
    "flower": BENCH / ".venv-flower" / "bin" / "python",
    "openfl": BENCH / ".venv-openfl" / "bin" / "python",
}
SCRIPT = {
    "floor": BENCH / "floor_run.py",
    "fedloom": BENCH / "fedloom_run.py",
    "flower": BENCH / "peers" / "flower_run.py",
    "openfl": BENCH / "peers" / "openfl_run.py",
}
PEERS = ("flower", "openfl")
CODECS = ("float16", "bfloat16", "int8", "topk", "zstd")


@dataclass(frozen=True)
class Row:
    """One line of a table: a workload on one framework, in one way."""

    group: str  # frameworks, grpc, secagg, codecs
    workload: Workload
    framework: str
    transport: str = "inprocess"
    overrides: tuple[str, ...] = ()
    label: str = ""

    @property
    def key(self) -> str:
        extra = f"-{self.label}" if self.label else ""
        return f"{self.group}/{self.workload.name}/{self.framework}-{self.transport}{extra}"


def rows() -> list[Row]:
    out: list[Row] = []
    for w in WORKLOADS.values():
        for framework in ("floor", "fedloom", *PEERS):
            out.append(Row("frameworks", w, framework))
    big3 = Workload("mlp10m-3", LARGE, sites=3, rounds=4)
    big10 = WORKLOADS["mlp10m-10"]
    for w in (big3, big10):
        out.append(Row("grpc", w, "fedloom", "inprocess"))
        out.append(Row("grpc", w, "fedloom", "grpc"))
    small = WORKLOADS["mlp9k-10"]
    secagg = ("privacy.secure_aggregation.bits=32",)
    for w in (small, big10):
        out.append(Row("secagg", w, "fedloom", overrides=(), label="off"))
        out.append(Row("secagg", w, "fedloom", overrides=secagg, label="on"))
    for codec in ("none", *CODECS):
        out.append(
            Row("codecs", big10, "fedloom", overrides=(f"compression.update={codec}",), label=codec)
        )
    return out


@dataclass
class Peak:
    """The largest PSS summed over a process and its descendants, while it runs."""

    pid: int
    bytes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def watch(self, every: float = 0.2) -> None:
        while not self._stop.is_set():
            total = sum(_pss(p) for p in _tree(self.pid))
            self.bytes = max(self.bytes, total)
            self.samples += 1
            self._stop.wait(every)

    def stop(self) -> None:
        self._stop.set()


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_once(row: Row, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedloom-bench-run-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            str(PYTHON[row.framework]),
            str(SCRIPT[row.framework]),
            "--workload",
            json.dumps(row.workload.to_json()),
            "--out",
            str(out),
        ]
        if row.framework == "fedloom":
            cmd += ["--transport", row.transport]
            for o in row.overrides:
                cmd += ["--set", o]
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        peak = Peak(proc.pid)
        watcher = threading.Thread(target=peak.watch, daemon=True)
        watcher.start()
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stderr += f"\n(killed after {timeout:g} s)"
        finally:
            peak.stop()
            watcher.join()
        wall = time.perf_counter() - started
        record: dict[str, Any] = {
            "row": row.key,
            "commit": _commit(),
            "wall_seconds": wall,
            "peak_pss_bytes": peak.bytes,
            "pss_samples": peak.samples,
        }
        if proc.returncode != 0 or not out.exists():
            record["error"] = f"exit {proc.returncode}: {(stderr or stdout)[-1500:]}"
            return record
        result = json.loads(out.read_text())
        seconds = result.get("round_seconds") or []
        record.update(
            {k: v for k, v in result.items() if k not in ("workload",)},
            median_round_seconds=statistics.median(seconds) if seconds else None,
        )
        return record


def _commit() -> str:
    """The checkout's commit, with ``+`` if it has changes: which code a run measured."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return ""
    return head + ("+" if dirty else "")


def available(framework: str) -> bool:
    return PYTHON[framework].exists() and SCRIPT[framework].exists()


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=[], help="row keys containing any of these")
    parser.add_argument("--skip-peers", action="store_true", help="no Flower, no OpenFL")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    chosen = [
        r
        for r in rows()
        if (not args.only or any(o in r.key for o in args.only))
        and not (args.skip_peers and r.framework in PEERS)
    ]
    missing = sorted({r.framework for r in chosen if not available(r.framework)})
    for m in missing:
        print(f"{m}: no environment at {PYTHON[m].parent.parent} (make bench makes it); skipped")
    chosen = [r for r in chosen if available(r.framework)]
    # one batch per workload and way of running it; frameworks alternate within it
    batches: dict[tuple[str, str], list[Row]] = {}
    for r in chosen:
        batches.setdefault((r.group, r.workload.name), []).append(r)
    runs: list[dict[str, Any]] = []
    total = len(chosen) * args.repeats
    done = 0
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for batch in batches.values():
            order = batch if repeat % 2 == 0 else list(reversed(batch))
            for row in order:
                done += 1
                record = run_once(row, args.timeout)
                record["repeat"] = repeat
                runs.append(record)
                took = time.perf_counter() - started
                figure = record.get("median_round_seconds")
                what = f"{figure:.4f} s/round" if figure is not None else "FAILED"
                print(
                    f"[{done}/{total} {took / 60:.1f} min] {row.key} #{repeat + 1}: {what}, "
                    f"peak {record['peak_pss_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
                if "error" in record:
                    print("   " + record["error"].strip().replace("\n", "\n   "), flush=True)
    document = {
        "machine": machine(),
        "repeats": args.repeats,
        "rows": [
            {
                "key": r.key,
                "group": r.group,
                "framework": r.framework,
                "transport": r.transport,
                "overrides": list(r.overrides),
                "label": r.label,
                "workload": r.workload.to_json(),
            }
            for r in chosen
        ],
        "runs": runs,
    }
    if args.out.exists() and args.only:  # a partial run updates its rows only
        old = json.loads(args.out.read_text())
        keys = {r.key for r in chosen}
        document["rows"] = [r for r in old["rows"] if r["key"] not in keys] + document["rows"]
        document["runs"] = [r for r in old["runs"] if r["row"] not in keys] + runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
