"""The benchmark workloads, shared by every runner (fedloom, the plain loop, the peers).

Standalone on purpose: it imports only numpy, scikit-learn and (lazily) torch, so the
peers' environments (Flower pins protobuf below 7; fedloom needs 7) can import it by
path without installing fedloom.

A workload is FedAvg of an MLP on scikit-learn's digits (8x8 images, 10 classes):
20 % held out (never used: evaluation is off everywhere), the rest split IID into
``sites`` equal parts; every round each site trains 1 local epoch of SGD from the
global model, and the global model becomes the sample-weighted mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TEST_FRACTION = 0.2
SEED = 0


@dataclass(frozen=True)
class Workload:
    name: str
    hidden: tuple[int, ...]  # hidden layer widths of the 64-...-10 MLP
    sites: int
    rounds: int
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    noop: bool = False  # sites do no training (orchestration cost only)

    @property
    def params(self) -> int:
        return mlp_params(self.hidden)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden), "params": self.params}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Workload:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["hidden"] = tuple(kw["hidden"])
        return cls(**kw)


SMALL = (128,)  # 64-128-10: 9,610 parameters
LARGE = (3156, 3156)  # 64-3156-3156-10: 10,200,202 parameters

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("mlp9k-10", SMALL, sites=10, rounds=20),
        Workload("mlp9k-100", SMALL, sites=100, rounds=10),
        Workload("mlp10m-10", LARGE, sites=10, rounds=4),
        Workload("mlp10m-100", LARGE, sites=100, rounds=3),
        Workload("noop-1000", SMALL, sites=1000, rounds=5, noop=True),
    )
}


def mlp_params(hidden: tuple[int, ...]) -> int:
    widths = (64, *hidden, 10)
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=False))


def build_model(hidden: tuple[int, ...]) -> Any:
    """The torch MLP 64-hidden...-10 with ReLU between layers."""
    from torch import nn

    widths = (64, *hidden, 10)
    layers: list[Any] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=False)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def sgd_epochs(model: Any, w: Workload, x: Any, y: Any, site: int, server_round: int) -> None:
    """The peers' local training: ``w.epochs`` epochs of plain SGD on tensors ``x, y``,
    batches shuffled by a generator seeded from the round and the site."""
    import torch

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=w.lr, momentum=w.momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(server_round * 1_000_003 + site)
    for _ in range(w.epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), w.batch_size):
            idx = order[start : start + w.batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()


def site_data(sites: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The training part of digits (pixels / 16) split IID into ``sites`` parts."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(y))
    train = order[int(round(len(y) * TEST_FRACTION)) :]
    x = (x[train] / 16.0).astype(np.float32)
    y = y[train].astype(np.int64)
    return [(x[i], y[i]) for i in np.array_split(np.arange(len(y)), sites)]


def runner_main(
    framework: str,
    run: Callable[[Workload], dict[str, Any]],
    description: str,
    argv: list[str] | None = None,
) -> int:
    """The command line every runner shares: ``--workload JSON --out FILE``; runs the
    workload, writes ``run``'s result as JSON and prints a one-line summary."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", required=True, help="JSON from Workload.to_json()")
    parser.add_argument("--out", required=True, type=Path, help="result JSON file")
    args = parser.parse_args(argv)
    workload = Workload.from_json(json.loads(args.workload))
    result = run(workload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rounds = result["round_seconds"]
    print(
        f"{framework} {result['version']} {workload.name}: {len(rounds)} rounds, "
        f"median {statistics.median(rounds):.3f} s/round, "
        f"setup {result.get('setup_seconds', 0.0):.1f} s, "
        f"wall {result['wall_seconds']:.1f} s -> {args.out}"
    )
    return 0
