"""Drift-correcting and personalising strategies against FedAvg where each should help.

    python bench/noniid_strategies.py [--seeds 0 1 2] [--rounds 20]

Three non-IID tasks (four cases), each run with FedAvg and with the strategy the literature says
helps there, for every seed (the plan's seed: the model's initialisation, the split,
the batches), in process (``simulate``, one worker):

- **label skew, SCAFFOLD** (Karimireddy et al., 2020): scikit-learn's digits over 10
  sites holding two classes each (``partition: shards:2``), an MLP trained 5 local
  epochs of plain SGD a round, so each site's model drifts towards its two classes.
  SCAFFOLD corrects each local step by ``c - c_i``; FedProx (``mu = 0.1``) runs too,
  as the other drift correction. Figure: test accuracy of the final model.
- **label skew, Ditto** (Li et al., 2021): the same task and sites; Ditto
  (``training.personal``, ``lam = 0.1``) trains a personal model at each site beside
  the global one. Figure: each site's accuracy on its own validation split with the
  model it would use (its personal model under Ditto, the global model under FedAvg),
  averaged over the sites.
- **feature shift, FedBN** (Li et al., 2021): scikit-learn's digits split evenly over 4
  sites, each site's pixels seen through its own "scanner" (gain, offset and noise of
  its own); an MLP with a batch-norm layer. FedBN keeps the batch-norm layer at each
  site (``training.local: ["1.*"]``); figure: the final global model's mean validation
  accuracy over the sites (each with its own batch norm under FedBN).
- **unequal local steps, FedNova** (Wang et al., 2020): Synthetic(0.5, 0.5) over 20
  sites (FedProx's data; sites of very different sizes), multinomial logistic
  regression; each site trains 1 to 5 local epochs (``1 + index % 5``), as devices of
  different speed would, so the sites' local step counts differ by up to two orders of
  magnitude. Figure: test accuracy and test loss of the final model.

Writes bench/results/noniid_strategies.json: every run's figures and the means over
the seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.report import summary

ROOT = Path(__file__).resolve().parents[1]

FEATURE_SHIFT_TASK = """
import numpy as np
from sklearn.datasets import load_digits
from torch import nn

from fedloom.tasks import SiteData, TorchTask

# each site's scanner: gain, offset and noise of its own
SCANNERS = [(0.5, 0.0, 0.2), (1.0, 4.0, 0.5), (2.0, -3.0, 1.0), (4.0, 8.0, 2.0)]


def build_model():
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


class ShiftedDigits(TorchTask):
    def load_data(self, ctx):
        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        mine = order[ctx.index :: len(SCANNERS)]
        gain, offset, noise = SCANNERS[ctx.index]
        rng = np.random.default_rng(ctx.index)
        x = digits.data[mine] * gain + offset + rng.normal(0, noise, (len(mine), 64))
        y = digits.target[mine].astype(np.int64)
        cut = int(0.8 * len(y))
        return SiteData(x[:cut].astype(np.float32), y[:cut], x[cut:].astype(np.float32), y[cut:])


task = ShiftedDigits(build_model)
"""

FEATURE_SHIFT_PLAN = """version: 1
name: feature-shift
task: task.py
seed: 0
rounds: 20
sites: 4
data:
  dataset: custom
training:
  epochs: 1
  batch_size: 32
  lr: 0.05
strategy:
  name: fedavg
evaluation:
  each_round: false
  final: true
"""

UNEQUAL_STEPS_TASK = '''
import dataclasses

from fedloom.tasks import SoftmaxRegression


class UnequalEpochs(SoftmaxRegression):
    """Each site trains 1 to 5 local epochs: devices of different speed."""

    def train(self, weights, data, settings, context):
        epochs = settings.epochs * (1 + context.index % 5)
        return super().train(weights, data, dataclasses.replace(settings, epochs=epochs), context)


task = UnequalEpochs(num_features=60, num_classes=10)
'''

UNEQUAL_STEPS_PLAN = """version: 1
name: unequal-steps
task: task.py
seed: 0
rounds: 20
sites: 20
data:
  dataset: synthetic
  synthetic: {alpha: 0.5, beta: 0.5}
training:
  epochs: 1
  batch_size: 10
  lr: 0.01
strategy:
  name: fedavg
evaluation:
  each_round: false
  final: true
"""

LABEL_SKEW_TASK = """
from torch import nn

from fedloom.tasks import TorchTask


def build_model():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


task = TorchTask(build_model)
"""

LABEL_SKEW_PLAN = """version: 1
name: label-skew
task: task.py
seed: 0
rounds: 20
sites: 10
data:
  dataset: digits
  partition: shards:2
  val_fraction: 0.2
  test_fraction: 0.2
training:
  epochs: 5
  batch_size: 16
  lr: 0.02
strategy:
  name: fedavg
evaluation:
  each_round: false
  final: true
"""

CASES = {
    "label-skew": {
        "task": LABEL_SKEW_TASK,
        "plan": LABEL_SKEW_PLAN,
        "arms": {
            "fedavg": [],
            "fedprox": ["strategy.name=fedprox", "strategy.proximal_mu=0.1"],
            "scaffold": ["strategy.name=scaffold"],
        },
        "figure": "test_accuracy",
    },
    "label-skew-personal": {
        "task": LABEL_SKEW_TASK,
        "plan": LABEL_SKEW_PLAN,
        "arms": {"fedavg": [], "ditto": ["training.personal.lam=0.1"]},
        "figure": "own_model_accuracy",
    },
    "feature-shift": {
        "task": FEATURE_SHIFT_TASK,
        "plan": FEATURE_SHIFT_PLAN,
        "arms": {"fedavg": [], "fedbn": ["training.local=['1.*']"]},
        "figure": "mean_site_accuracy",
    },
    "unequal-steps": {
        "task": UNEQUAL_STEPS_TASK,
        "plan": UNEQUAL_STEPS_PLAN,
        "arms": {"fedavg": [], "fednova": ["strategy.name=fednova"]},
        "figure": "test_accuracy",
    },
}


def run_case(work: Path, name: str, case: dict[str, Any], seeds: list[int], rounds: int) -> dict:
    ws = work / name
    ws.mkdir()
    (ws / "task.py").write_text(case["task"])
    (ws / "federation.yaml").write_text(case["plan"])
    runs = []
    for seed in seeds:
        for arm, overrides in case["arms"].items():
            plan = load_plan(ws, [f"seed={seed}", f"rounds={rounds}", *overrides])
            started = time.perf_counter()
            result = simulate(ws, plan, SimulationOptions(workers=1))
            figures = summary(result, f"{name}-{arm}-{seed}")
            runs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "seconds": time.perf_counter() - started,
                    **{
                        k: figures.get(k)
                        for k in (
                            "test_accuracy",
                            "test_loss",
                            "mean_site_accuracy",
                            "worst_site_accuracy",
                            "mean_personal_accuracy",
                        )
                    },
                    # each site's model on its own validation split: its personal model
                    # under Ditto, else the global model
                    "own_model_accuracy": figures.get(
                        "mean_personal_accuracy", figures.get("mean_site_accuracy")
                    ),
                }
            )
            print(name, arm, seed, {k: runs[-1][k] for k in ("test_accuracy", case["figure"])})
    means = {
        arm: {
            key: statistics.mean(r[key] for r in runs if r["arm"] == arm and r[key] is not None)
            for key in (
                "test_accuracy",
                "test_loss",
                "mean_site_accuracy",
                "mean_personal_accuracy",
                "own_model_accuracy",
            )
            if any(r[key] is not None for r in runs if r["arm"] == arm)
        }
        for arm in case["arms"]
    }
    return {"figure": case["figure"], "runs": runs, "means": means}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        default=list(CASES),
        help="run these cases only; the others keep their results in --out",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "noniid_strategies.json"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedloom-noniid-"))
    try:
        fresh = {
            name: run_case(work, name, CASES[name], args.seeds, args.rounds) for name in args.cases
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kept: dict[str, Any] = {}
    if set(args.cases) != set(CASES) and args.out.is_file():
        old = json.loads(args.out.read_text())
        if (old["seeds"], old["rounds"]) == (args.seeds, args.rounds):
            kept = old["cases"]
    results = {n: fresh.get(n, kept.get(n)) for n in CASES if n in fresh or n in kept}
    doc = {"seeds": args.seeds, "rounds": args.rounds, "cases": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v["means"] for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
