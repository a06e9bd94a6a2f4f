"""Turn the raw benchmark results into docs/benchmarks.md and its plot.

    .venv/bin/python bench/report.py

Reads bench/results/frameworks.json (``bench/run.py``), bench/results/compression.json
(``bench/compression.py``), bench/results/ray_backend.json (``bench/ray_backend.py``),
bench/results/grpc_large_model*.json (``bench/grpc_large_model.py``),
bench/results/lora_bytes.json (``bench/lora_bytes.py``) and
bench/results/noniid_strategies.json (``bench/noniid_strategies.py``),
bench/results/contributions.json (``bench/contributions.py``) when present. Every figure in
the document is computed here from those files.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "benchmarks.png"
NAMES = {"floor": "plain loop", "fedloom": "fedloom", "flower": "Flower", "openfl": "OpenFL"}
MAIN = ("mlp9k-10", "mlp9k-100", "mlp10m-10", "mlp10m-100", "noop-1000")


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


class Figures:
    """Each row's median over its repeats (runs that failed are counted apart)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.rows = {r["key"]: r for r in doc["rows"]}
        self.runs: dict[str, list[dict[str, Any]]] = {}
        for run in doc["runs"]:
            self.runs.setdefault(run["row"], []).append(run)

    def find(self, group: str, workload: str, framework: str, **match: Any) -> str | None:
        for key, row in self.rows.items():
            if (row["group"], row["workload"]["name"], row["framework"]) != (
                group,
                workload,
                framework,
            ):
                continue
            if all(row.get(k) == v for k, v in match.items()):
                return key
        return None

    def good(self, key: str | None) -> list[dict[str, Any]]:
        if key is None:
            return []
        return [r for r in self.runs.get(key, []) if "error" not in r]

    def seconds(self, key: str | None) -> float | None:
        runs = self.good(key)
        return statistics.median(r["median_round_seconds"] for r in runs) if runs else None

    def peak(self, key: str | None) -> float | None:
        runs = self.good(key)
        return statistics.median(r["peak_pss_bytes"] for r in runs) if runs else None

    def value(self, key: str | None, field: str) -> float | None:
        runs = [r for r in self.good(key) if r.get(field) is not None]
        return statistics.median(r[field] for r in runs) if runs else None

    def errors(self, key: str | None) -> list[str]:
        if key is None:
            return []
        return [r["error"] for r in self.runs.get(key, []) if "error" in r]

    def spread(self, key: str | None) -> str:
        runs = self.good(key)
        if len(runs) < 2:
            return ""
        values = [r["median_round_seconds"] for r in runs]
        return f"{min(values):.3g}-{max(values):.3g}"


def s(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(header: Iterable[str], lines: Iterable[Iterable[str]]) -> str:
    head = list(header)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def frameworks_section(f: Figures, checks: list[tuple[str, bool | None, str]]) -> str:
    lines = []
    for name in MAIN:
        key = {fw: f.find("frameworks", name, fw) for fw in NAMES}
        if not any(key.values()):
            continue
        w = f.rows[next(k for k in key.values() if k)]["workload"]
        sec = {fw: f.seconds(k) for fw, k in key.items()}
        mem = {fw: f.peak(k) for fw, k in key.items()}
        to_floor = ratio(sec["fedloom"], sec["floor"])
        to_flower = ratio(sec["fedloom"], sec["flower"])
        lines.append(
            [
                name,
                f"{w['params']:,}",
                str(w["sites"]),
                *(f"{s(sec[fw])} s ({gb(mem[fw])})" for fw in NAMES),
                s(to_floor, 2),
                s(to_flower, 2),
            ]
        )
        if not w.get("noop"):
            checks.append(
                (
                    f"{name}: fedloom <= 1.5x the plain loop",
                    None if to_floor is None else to_floor <= 1.5,
                    f"{s(to_floor, 3)}x",
                )
            )
        if w["params"] < 100_000 and not w.get("noop"):
            checks.append(
                (
                    f"{name}: fedloom <= 1/5 of Flower",
                    None if to_flower is None else to_flower <= 0.2,
                    f"{s(to_flower, 3)}x",
                )
            )
        if name == "mlp10m-100":
            checks.append(
                (
                    f"{name}: fedloom <= 1/3 of Flower",
                    None if to_flower is None else to_flower <= 1 / 3,
                    f"{s(to_flower, 3)}x",
                )
            )
            checks.append(
                (
                    f"{name}: fedloom peak memory <= 1.5 GB (PSS, whole process tree)",
                    None if mem["fedloom"] is None else mem["fedloom"] <= 1.5e9,
                    "-" if mem["fedloom"] is None else f"{mem['fedloom'] / 1e9:.2f} GB",
                )
            )
    header = [
        "workload",
        "params",
        "sites",
        *(f"{n}: s/round (peak)" for n in NAMES.values()),
        "fedloom / loop",
        "fedloom / Flower",
    ]
    return table(header, lines)


def grpc_section(f: Figures, checks: list[tuple[str, bool | None, str]]) -> str:
    lines = []
    for name in ("mlp10m-3", "mlp10m-10"):
        local = f.find("grpc", name, "fedloom", transport="inprocess")
        remote = f.find("grpc", name, "fedloom", transport="grpc")
        if local is None and remote is None:
            continue
        a, b = f.seconds(local), f.seconds(remote)
        lines.append(
            [
                name,
                f"{s(a)} s ({gb(f.peak(local))})",
                f"{s(b)} s ({gb(f.peak(remote))})",
                s(ratio(b, a), 2),
            ]
        )
        if name == "mlp10m-10":
            r = ratio(b, a)
            checks.append(
                (
                    "gRPC + mTLS, 10M params, 10 collaborators: within 2x of in-process",
                    None if r is None else r <= 2.0,
                    f"{s(r, 3)}x",
                )
            )
    return table(["workload", "in-process simulation", "gRPC, mTLS, loopback", "ratio"], lines)


def secagg_section(f: Figures) -> str:
    lines = []
    for name in ("mlp9k-10", "mlp10m-10"):
        off = f.find("secagg", name, "fedloom", label="off")
        on = f.find("secagg", name, "fedloom", label="on")
        if off is None and on is None:
            continue
        a, b = f.seconds(off), f.seconds(on)
        lines.append(
            [
                name,
                f"{s(a)} s",
                f"{s(b)} s",
                s(ratio(b, a), 2),
                s(ratio(f.value(on, "bytes_received"), f.value(off, "bytes_received")), 3),
            ]
        )
    return table(
        ["workload", "secure aggregation off", "on (32-bit ring)", "ratio", "bytes up, ratio"],
        lines,
    )


def codecs_section(f: Figures) -> str:
    lines = []
    base_key = f.find("codecs", "mlp10m-10", "fedloom", label="none")
    base_up = f.value(base_key, "bytes_received")
    base_s = f.seconds(base_key)
    for row in f.rows.values():
        if row["group"] != "codecs":
            continue
        key = row["key"]
        up = f.value(key, "bytes_received")
        down = f.value(key, "bytes_sent")
        sec = f.seconds(key)
        lines.append(
            [
                row["label"],
                s(sec),
                s(ratio(sec, base_s), 2),
                "-" if up is None else f"{up / 1e6:,.1f} MB",
                "-" if down is None else f"{down / 1e6:,.1f} MB",
                s(ratio(base_up, up), 3),
            ]
        )
    return table(
        ["update codec", "s/round", "vs none", "bytes up", "bytes down", "upload reduction"],
        lines,
    )


def accuracy_section(comp: dict[str, Any], checks: list[tuple[str, bool | None, str]]) -> str:
    lines = []
    best: tuple[float, float] | None = None
    for row in comp["rows"]:
        label = row["update"] + (
            "" if row["update"] != "topk" else f" {row.get('topk_fraction', '')}"
        )
        label += "" if row.get("model", "none") == "none" else f", model {row['model']}"
        lines.append(
            [
                label.strip(),
                f"{row['test_accuracy']:.4f}",
                f"{row['accuracy_delta_points']:+.2f}",
                f"{row['upload_bytes'] / 1e6:,.2f} MB",
                f"{row['download_bytes'] / 1e6:,.2f} MB",
                f"{row['upload_ratio']:.2f}x",
                f"{row['total_ratio']:.2f}x",
            ]
        )
        if row["update"] in ("int8", "topk") and row["accuracy_delta_points"] >= -1.0:
            cand = (row["upload_ratio"], row["accuracy_delta_points"])
            best = cand if best is None or cand[0] > best[0] else best
    checks.append(
        (
            "int8 or top-k: >= 3.5x fewer upload bytes at <= 1 point of accuracy lost",
            None if best is None else best[0] >= 3.5,
            "none within 1 point" if best is None else f"{best[0]:.2f}x at {best[1]:+.2f} points",
        )
    )
    seeds = ", ".join(str(x) for x in comp.get("seeds", []))
    intro = (
        f"The digits demo ({comp.get('workload')}, {comp.get('sites')} sites, "
        f"{comp.get('rounds')} rounds, {comp.get('partition')}), mean test accuracy over "
        f"seeds {seeds}; bytes summed over the run.\n\n"
    )
    return intro + table(
        [
            "codec",
            "test accuracy",
            "vs none (points)",
            "upload",
            "download",
            "upload reduction",
            "total reduction",
        ],
        lines,
    )


def ray_section(ray: dict[str, Any], checks: list[tuple[str, bool | None, str]]) -> str:
    a, b = ray.get("default_accuracy"), ray.get("ray_accuracy")
    same = None if a is None or b is None else abs(a - b) <= 1e-9
    checks.append(
        ("Ray backend: same accuracy as the default backend", same, f"{s(b, 4)} vs {s(a, 4)}")
    )
    return (
        table(
            ["backend", "test accuracy", "wall seconds"],
            [
                ["default (worker processes)", s(a, 4), s(ray.get("default_seconds"))],
                ["ray (local head)", s(b, 4), s(ray.get("ray_seconds"))],
            ],
        )
        + f"\n\n{ray.get('workload', '')}"
    )


def large_model_section(checks: list[tuple[str, bool | None, str]]) -> str | None:
    """``grpc_large_model.py``'s runs (float32 and bfloat16) and ``lora_bytes.py``'s."""
    lines = []
    for name in ("grpc_large_model.json", "grpc_large_model-bfloat16.json"):
        r = load(name)
        if r is None:
            continue
        dtype = r.get("dtype", "float32")
        identical = r.get("final_model_identical_to_in_process")
        lines.append(
            [
                dtype,
                gb(r["model_bytes"]),
                str(r["sites"]),
                gb(r["aggregator_peak_rss_bytes"]),
                f"{r['aggregator_peak_over_model']:.2f}x",
                {True: "yes", False: "**no**", None: "not compared"}[identical],
                s(r["round_seconds"], 3),
            ]
        )
        if dtype == "bfloat16":
            ok = r["aggregator_peak_over_model"] <= 2.5 and identical is True
            checks.append(
                (
                    "1 GiB bfloat16 over gRPC, 2 sites: aggregator peak <= 2.5x the model, "
                    "final model identical to the in-process run",
                    ok,
                    f"{r['aggregator_peak_over_model']:.2f}x, identical: {identical}",
                )
            )
    parts = []
    if lines:
        parts.append(
            table(
                [
                    "model dtype",
                    "model",
                    "sites",
                    "aggregator peak (VmHWM)",
                    "peak / model",
                    "final model = in-process",
                    "round seconds",
                ],
                lines,
            )
            + "\n\n`bench/grpc_large_model.py --gib 1 --dtype DTYPE [--compare]`: one FedAvg "
            "round over gRPC with mutual TLS on loopback, real processes. A float32 model is "
            "folded into int64 sums as it streams in; a bfloat16 one is summed from the "
            "updates' spools when the round closes (docs/architecture.md, the fixed-point "
            "accumulator)."
        )
    lora = load("lora_bytes.json")
    if lora is not None:
        a, w = lora["runs"]["adapter"], lora["runs"]["whole-model"]
        workload = lora["workload"][:1].upper() + lora["workload"][1:]
        parts.append(
            table(
                ["what travels", "sent per round", "received per round", "test perplexity"],
                [
                    [
                        f"the adapter ({a['federated_bytes']:,} B a site)",
                        f"{a['bytes_sent_per_round']:,.0f} B",
                        f"{a['bytes_received_per_round']:,.0f} B",
                        s(a["test_perplexity"], 4),
                    ],
                    [
                        f"the whole model ({w['federated_bytes']:,} B a site)",
                        f"{w['bytes_sent_per_round']:,.0f} B",
                        f"{w['bytes_received_per_round']:,.0f} B",
                        s(w["test_perplexity"], 4),
                    ],
                ],
            )
            + f"\n\n{workload}: the same LoRA training, with `model.federated: "
            "trainable` (the adapter travels) and `all` (every tensor travels, the frozen "
            f"base included): {lora['sent_ratio_whole_over_adapter']:.1f}x the bytes for "
            "the same model (`bench/lora_bytes.py`)."
        )
    return "\n\n".join(parts) if parts else None


def noniid_section(doc: dict[str, Any], checks: list[tuple[str, bool | None, str]]) -> str:
    """``noniid_strategies.py``: each case's arms, per seed and their mean."""
    labels = {
        "label-skew": "label skew (digits, 10 sites of 2 classes, 5 local epochs)",
        "label-skew-personal": "label skew, personal models (the same task and sites)",
        "feature-shift": "feature shift (digits, 4 sites, a scanner each)",
        "unequal-steps": "unequal local steps (Synthetic(0.5, 0.5), 20 sites, 1-5 epochs)",
    }
    lines = []
    for name, case in doc["cases"].items():
        figure = case["figure"]
        arms = list(case["means"])
        for arm in arms:
            per_seed = [r[figure] for r in case["runs"] if r["arm"] == arm]
            lines.append(
                [
                    labels.get(name, name),
                    arm,
                    figure,
                    ", ".join(f"{v:.4f}" for v in per_seed),
                    f"{case['means'][arm][figure]:.4f}",
                ]
            )
        base, other = arms[0], arms[-1]  # FedAvg, and the strategy the case is for
        better = case["means"][other][figure] > case["means"][base][figure]
        checks.append(
            (
                f"{name}: {other} beats {base} ({figure}, mean of {len(doc['seeds'])} seeds)",
                better,
                f"{case['means'][other][figure]:.4f} vs {case['means'][base][figure]:.4f}",
            )
        )
    return (
        table(["task", "strategy", "figure", "per seed", "mean"], lines)
        + f"\n\n`bench/noniid_strategies.py`: seeds {', '.join(map(str, doc['seeds']))}, "
        f"{doc['rounds']} rounds, in process. `mean_site_accuracy`: the final global model "
        "on each site's validation split (with the site's own batch norm under FedBN), "
        "averaged over the sites; `own_model_accuracy`: the same with the model each site "
        "would use (its Ditto personal model; FedAvg's global model); `test_accuracy`: the "
        "final model on the held-out test set."
    )


def contributions_section(doc: dict[str, Any], checks: list[tuple[str, bool | None, str]]) -> str:
    """``contributions.py``: each seed's scores of the two noisy sites and the ranking."""
    noisy = doc["noisy"]
    lines = []
    for run in doc["runs"]:
        for method in run["methods"]:
            by_site = {s: v[method] for s, v in run["sites"].items()}
            order = sorted(by_site, key=lambda s: (-by_site[s], s))
            clean = [v for s, v in by_site.items() if s not in noisy]
            lines.append(
                [
                    str(run["seed"]),
                    method,
                    f"{run['full']:.4f}",
                    ", ".join(f"{by_site[s]:+.4f}" for s in noisy),
                    f"{min(clean):+.4f} .. {max(clean):+.4f}",
                    " ".join(s.removeprefix("site-") for s in order),
                    "yes" if run["noisy_last"][method] else "no",
                ]
            )
    for method, ok in doc["noisy_last"].items():
        checks.append(
            (
                f"contributions ({method}): the {len(noisy)} noisy sites ranked last, every seed",
                ok,
                f"{sum(r['noisy_last'][method] for r in doc['runs'])} of {len(doc['runs'])} seeds",
            )
        )
    return (
        table(
            [
                "seed",
                "method",
                "test accuracy",
                f"scores of {', '.join(noisy)}",
                "other sites' scores",
                "ranking (site numbers)",
                "noisy last",
            ],
            lines,
        )
        + f"\n\n`bench/contributions.py`: digits over {doc['sites']} sites, "
        f"{', '.join(noisy)} holding pure label noise; {doc['rounds']} rounds, "
        f"Monte-Carlo Shapley with {doc['permutations']} orderings; seeds "
        f"{', '.join(map(str, doc['seeds']))}. A score is the change in the final model's "
        "test accuracy the site brings (docs/contributions.md); `proxy` is instead the "
        "aggregator's per-round contribution proxy of the whole run (each update's mean "
        "cosine with the federation's last step, rounds 2 to 5), which needs no coalition."
    )


def plot(f: Figures) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [n for n in MAIN if any(f.find("frameworks", n, fw) for fw in NAMES)]
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(NAMES)
    for i, (fw, label) in enumerate(NAMES.items()):
        values = [f.seconds(f.find("frameworks", n, fw)) for n in names]
        xs = [j + (i - (len(NAMES) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [v or 0 for v in values], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per round (median, log scale)")
    ax.set_title("FedAvg on digits, 1 local epoch, evaluation off (lower is better)")
    ax.legend()
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    doc = load("frameworks.json")
    comp = load("compression.json")
    ray = load("ray_backend.json")
    checks: list[tuple[str, bool | None, str]] = []
    parts = [
        "# Benchmarks\n",
        "Generated by `bench/report.py` from the raw results in `bench/results/` "
        "(`make bench`); do not edit by hand.\n",
    ]
    if doc is not None:
        f = Figures(doc)
        m = doc["machine"]
        parts.append(
            f"Machine: {m['cpus']} CPUs ({m['cpu']}), {m['memory_bytes'] / 2**30:.0f} GiB, "
            f"Python {m['python']}, {m['date']}. Each figure is the median over "
            f"{doc['repeats']} runs of each run's median seconds per round; runs alternate "
            "between frameworks. Peak memory is PSS summed over each run's process tree.\n"
        )
        parts.append("## FedAvg, the same workload on each framework\n")
        parts.append(
            "A torch MLP on scikit-learn's digits, split IID, every site every round, 1 local "
            "epoch of SGD (batch 16, lr 0.05), evaluation off everywhere. The plain loop trains "
            "each site in turn and averages in numpy: the floor. `noop-1000`: 1,000 sites that "
            "return the model unchanged (orchestration only).\n"
        )
        parts.append(frameworks_section(f, checks) + "\n")
        if plot(f):
            parts.append("![seconds per round](img/benchmarks.png)\n")
        failed = [(k, e) for k in f.rows for e in f.errors(k)]
        if failed:
            parts.append("Runs that failed (not in the medians):\n")
            parts += [f"- `{k}`: {e.strip().splitlines()[-1][:300]}" for k, e in failed]
            parts.append("")
        parts.append("## gRPC with mutual TLS on loopback against the in-process simulation\n")
        parts.append(grpc_section(f, checks) + "\n")
        parts.append("## Secure aggregation\n")
        parts.append(secagg_section(f) + "\n")
        parts.append("## Compression codecs: time and bytes (10.2M params, 10 sites)\n")
        parts.append(codecs_section(f) + "\n")
    if comp is not None:
        parts.append("## Compression codecs: accuracy on the digits demo\n")
        parts.append(accuracy_section(comp, checks) + "\n")
    if ray is not None:
        parts.append("## Ray backend\n")
        parts.append(ray_section(ray, checks) + "\n")
    noniid = load("noniid_strategies.json")
    if noniid is not None:
        parts.append("## Strategies on non-IID data\n")
        parts.append(noniid_section(noniid, checks) + "\n")
    scores = load("contributions.json")
    if scores is not None:
        parts.append("## Contribution scores\n")
        parts.append(contributions_section(scores, checks) + "\n")
    large = large_model_section(checks)
    if large is not None:
        parts.append("## Large models and adapters\n")
        parts.append(large + "\n")
    if checks:
        parts.append("## Targets\n")
        parts.append(
            table(
                ["target", "met", "measured"],
                [
                    [t, {True: "yes", False: "**no**", None: "not measured"}[ok], v]
                    for t, ok, v in checks
                ],
            )
            + "\n"
        )
    DOC.write_text("\n".join(parts))
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
