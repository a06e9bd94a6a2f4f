"""Contribution scores find the sites whose data is pure label noise.

    python bench/contributions.py [--seeds 0 1 2] [--permutations 6] [--rounds 5]

scikit-learn's digits over 8 sites (disjoint samples, 150 training examples each); sites
``site-07`` and ``site-08`` hold pure label noise (each label drawn uniformly at
random). A softmax regression is trained for ``--rounds`` rounds, then each site's
contribution to the final model's test accuracy is scored by leave-one-out and by the
Monte-Carlo Shapley estimate (``--permutations`` orderings, no truncation), the way
``fedloom contributions`` does, and by the aggregator's per-round proxy of the whole run
(``evaluation.contributions``: each update's mean cosine with the last step), for every
seed (the plan's seed: the initialisation,
the batches and the sampled orderings).

Writes bench/results/contributions.json: per seed, each site's scores, the ranking, the
number of coalitions trained and the wall time; and whether each method ranks the two
noisy sites last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.results import contribution_proxy
from fedloom.simulation.valuation import site_contributions

ROOT = Path(__file__).resolve().parents[1]
NOISY = ("site-07", "site-08")

TASK = """
import numpy as np
from sklearn.datasets import load_digits

from fedloom.tasks import SiteData, SoftmaxRegression

NOISY = (6, 7)  # these sites' labels are pure noise


def _digits():
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    return (digits.data[order] / 16.0).astype(np.float32), digits.target[order].astype(np.int64)


class Digits(SoftmaxRegression):
    def load_data(self, ctx):
        x, y = _digits()
        x, y = x[ctx.index : 1440 : 8], y[ctx.index : 1440 : 8].copy()
        if ctx.index in NOISY:
            y = np.random.default_rng(100 + ctx.index).integers(0, 10, len(y))
        return SiteData(x[:150], y[:150], x[150:], y[150:])

    def load_test_data(self, ctx):
        x, y = _digits()
        return x[1440:], y[1440:]


task = Digits(num_features=64, num_classes=10)
"""

PLAN = """version: 1
name: noisy-sites
task: task.py
seed: {seed}
rounds: {rounds}
sites: 8
data:
  dataset: custom
training:
  epochs: 1
  batch_size: 16
  lr: 0.1
evaluation:
  each_round: false
  final: false
  contributions: true
"""


def run_seed(work: Path, seed: int, rounds: int, permutations: int) -> dict:
    ws = work / f"seed-{seed}"
    ws.mkdir()
    (ws / "task.py").write_text(TASK)
    (ws / "federation.yaml").write_text(PLAN.format(seed=seed, rounds=rounds))
    plan = load_plan(ws)
    started = time.perf_counter()
    whole = simulate(ws, plan, SimulationOptions(workers=0, test_initial=True))
    scores = site_contributions(
        ws, plan, SimulationOptions(workers=0), whole, permutations=permutations
    )
    seconds = time.perf_counter() - started
    doc = scores.to_json()
    proxy = contribution_proxy(whole.history)  # the aggregator's, from the whole run
    assert proxy is not None
    doc["methods"] = [*doc["methods"], "proxy"]
    for site, row in doc["sites"].items():
        row["proxy"] = proxy["sites"][site]["mean_cosine"]
    last = {"proxy": set(proxy["ranking"][-len(NOISY) :]) == set(NOISY)}
    for method, by_site in scores.by_method.items():
        order = sorted(by_site, key=lambda s: (-by_site[s], s))
        last[method] = set(order[-len(NOISY) :]) == set(NOISY)
    print(f"seed {seed}: {seconds:.0f} s, {doc['runs']} coalitions, noisy last: {last}")
    return {"seed": seed, "seconds": round(seconds, 1), "noisy_last": last, **doc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--permutations", type=int, default=6)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "contributions.json"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedloom-contributions-"))
    try:
        runs = [run_seed(work, s, args.rounds, args.permutations) for s in args.seeds]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "seeds": args.seeds,
        "rounds": args.rounds,
        "permutations": args.permutations,
        "sites": 8,
        "noisy": list(NOISY),
        "runs": runs,
        "noisy_last": {m: all(r["noisy_last"][m] for r in runs) for m in runs[0]["noisy_last"]},
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["noisy_last"]))


if __name__ == "__main__":
    main()
