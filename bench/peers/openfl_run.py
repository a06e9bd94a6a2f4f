"""Run one benchmark workload on OpenFL (a peer framework) and write its round times.

    bench/.venv-openfl/bin/python bench/peers/openfl_run.py \
        --workload '{"name": "mlp9k-10", ...}' --out result.json

OpenFL 1.9's Workflow API: an ``FLSpec`` flow whose ``start`` and ``join`` steps are
placed on the ``Aggregator`` and whose ``train`` step runs on every ``Collaborator``
(``foreach="collaborators"``: every site, every round), run by ``LocalRuntime`` with
the ``single_process`` backend: OpenFL's default, and its only backend that needs no
Ray cluster or GPU groups; the steps run one after another in this process (the
``ray`` backend would run them in Ray actors, ``num_actors`` at a time). FedAvg weights
each site by its sample count; no evaluation anywhere.

Runs in its own virtual environment (``bench/.venv-openfl``) and never imports fedloom:
the workload comes from ``bench/workloads.py`` by path.
"""

from __future__ import annotations

import os

# Metaflow (under OpenFL's Workflow API) needs a user name; the machine may have none.
os.environ.setdefault("USERNAME", "bench")

import contextlib  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

T0 = time.perf_counter()
BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from workloads import (  # noqa: E402
    Workload,
    build_model,
    runner_main,
    sgd_epochs,
    site_data,
)

with warnings.catch_warnings(), contextlib.redirect_stdout(None):
    warnings.simplefilter("ignore")  # metaflow's pkg_resources deprecation warning
    from openfl.experimental.workflow.interface import Aggregator, Collaborator, FLSpec
    from openfl.experimental.workflow.placement import aggregator as _aggregator
    from openfl.experimental.workflow.placement import collaborator as _collaborator
    from openfl.experimental.workflow.runtime import LocalRuntime

Weights = dict[str, np.ndarray]


def aggregator(step: Any) -> Any:
    """OpenFL's ``aggregator`` placement, without its "step registered" print."""
    with contextlib.redirect_stdout(None):
        return _aggregator(step)


def collaborator(step: Any) -> Any:
    """OpenFL's ``collaborator`` placement, without its "step registered" print."""
    with contextlib.redirect_stdout(None):
        return _collaborator(step)


# Round stamps live outside the flow: OpenFL deep-copies every flow attribute to every
# collaborator's clone each round.
STAMPS: dict[str, list[float]] = {"started": [], "aggregated": []}


@functools.lru_cache(maxsize=4)
def cached_site_data(sites: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return site_data(sites)


@functools.lru_cache(maxsize=2)
def cached_model(hidden: tuple[int, ...]) -> Any:
    """One model for the process; each site's step loads the global weights into it."""
    return build_model(hidden)


def warm_up_torch() -> None:
    """Pay torch's one-off lazy initialisation (about 1.5 s on the first SGD step)."""
    scratch = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(scratch.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(scratch(torch.zeros(1, 2)), torch.zeros(1).long()).backward()
    opt.step()


def train_locally(
    workload: Workload, site: int, server_round: int, weights: Weights, x_np: Any, y_np: Any
) -> Weights:
    """``epochs`` epochs of plain SGD from the global weights."""
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    model = cached_model(workload.hidden)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    sgd_epochs(model, workload, x, y, site, server_round)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def fedavg(updates: list[tuple[Weights, int]]) -> Weights:
    """The sample-weighted mean of the sites' weights (as Flower's FedAvg computes it)."""
    total = sum(n for _, n in updates)
    mean: Weights = {}
    for weights, n in updates:
        for key, value in weights.items():
            if key in mean:
                mean[key] += value * (n / total)
            else:
                mean[key] = value * (n / total)
    return mean


class FedAvgFlow(FLSpec):
    """All sites train every round from the global weights; the aggregator averages."""

    def __init__(self, workload: Workload, weights: Weights, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.workload = workload
        self.weights = weights
        self.current_round = 1

    @aggregator
    def start(self) -> None:
        self.collaborators = self.runtime.collaborators
        STAMPS["started"].append(time.perf_counter())
        self.next(self.train, foreach="collaborators")

    @collaborator
    def train(self) -> None:
        # ``site``, ``x`` and ``y`` are this collaborator's private attributes.
        self.samples = len(self.y)
        if not self.workload.noop:
            self.weights = train_locally(
                self.workload, self.site, self.current_round, self.weights, self.x, self.y
            )
        self.next(self.join)

    @aggregator
    def join(self, inputs: list[Any]) -> None:
        self.weights = fedavg([(i.weights, i.samples) for i in inputs])
        STAMPS["aggregated"].append(time.perf_counter())
        if self.current_round < self.workload.rounds:
            self.current_round += 1
            self.next(self.train, foreach="collaborators")
        else:
            self.next(self.end)

    @aggregator
    def end(self) -> None:
        pass


def site_attributes(sites: int, site: int) -> dict[str, Any]:
    x, y = cached_site_data(sites)[site]
    return {"site": site, "x": x, "y": y}


def run(workload: Workload) -> dict[str, Any]:
    torch.set_num_threads(1)
    STAMPS["started"].clear()
    STAMPS["aggregated"].clear()
    torch.manual_seed(0)
    initial = {
        k: v.detach().numpy().copy() for k, v in build_model(workload.hidden).state_dict().items()
    }
    if not workload.noop:
        cached_model(workload.hidden)
        warm_up_torch()
    collaborators = [
        Collaborator(
            name=f"site{i}",
            private_attributes_callable=site_attributes,
            sites=workload.sites,
            site=i,
        )
        for i in range(workload.sites)
    ]
    # Metaflow (under the Workflow API) writes its run metadata to ./.metaflow.
    with (
        tempfile.TemporaryDirectory(prefix="openfl-run-") as scratch,
        contextlib.chdir(scratch),
        open(os.devnull, "w") as devnull,
        contextlib.redirect_stdout(devnull),  # OpenFL prints every step it calls
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        flow = FedAvgFlow(workload, initial, checkpoint=False)
        flow.runtime = LocalRuntime(
            aggregator=Aggregator(), collaborators=collaborators, backend="single_process"
        )
        flow.run()
    end = time.perf_counter()
    started, aggregated = STAMPS["started"], STAMPS["aggregated"]
    if len(aggregated) != workload.rounds:
        raise RuntimeError(f"OpenFL finished {len(aggregated)} of {workload.rounds} rounds")
    starts = [started[0], *aggregated[:-1]]
    return {
        "framework": "openfl",
        "version": version("openfl"),
        "backend": "single_process",
        "workload": workload.to_json(),
        "round_seconds": [b - a for a, b in zip(starts, aggregated, strict=True)],
        "wall_seconds": end - T0,
        "setup_seconds": started[0] - T0,
        "cpus": os.cpu_count() or 1,
    }


def main(argv: list[str] | None = None) -> int:
    return runner_main("openfl", run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
