"""Run one benchmark workload on Flower (the peer framework) and write its round times.

    bench/.venv-flower/bin/python bench/peers/flower_run.py \
        --workload '{"name": "mlp9k-10", ...}' --out result.json

Flower 1.42's message API in its Simulation Runtime: ``flwr.simulation.run_simulation``
with a ``ServerApp`` whose main calls ``FedAvg.start`` and a ``ClientApp`` with a
``@train()`` function, on the Ray backend (one CPU per client, ``os.cpu_count()`` CPUs
in all). Every site is selected every round, FedAvg weights by sample count, and
evaluation is off everywhere (no federated, no centralised, no in-fit evaluation).

Setup (``setup_seconds``) runs until round 1 is configured: imports, Ray's start, every
node registered, then a warm-up query message to every node (``warmup_seconds``) so
that Ray's workers have started, imported torch and this module, cached the data and
paid torch's first-step cost before round 1. Flower's stock polling stays as it is
(the in-memory grid and the simulation loop both poll every 0.1 s), so its round times
come in steps of about 0.1 s.

Runs in its own virtual environment (``bench/.venv-flower``: Flower pins protobuf
below 7, fedloom needs 7), so fedloom is never imported: the workload comes from
``bench/workloads.py`` by path.
"""

from __future__ import annotations

import os

# Before Flower is imported: no telemetry (no network here); only Flower's errors
# (FLWR_LOG_LEVEL=INFO in the environment shows its round log).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

T0 = time.perf_counter()
BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import flwr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from workloads import (  # noqa: E402
    Workload,
    build_model,
    runner_main,
    sgd_epochs,
    site_data,
)

# Object store for the model messages: Ray's default is 30 % of memory; the largest
# workload moves 100 sites x 41 MB per round, so 4 GiB is ample on a 24 GiB machine.
OBJECT_STORE_BYTES = 4 * 1024**3
QUERY = MessageType.QUERY


# --------------------------------------------------------------------------- clients


@functools.lru_cache(maxsize=4)
def cached_site_data(sites: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return site_data(sites)


@functools.lru_cache(maxsize=2)
def cached_model(hidden: tuple[int, ...]) -> Any:
    """One model per worker process; each client call loads the global weights into it."""
    return build_model(hidden)


@functools.lru_cache(maxsize=8)
def parse_workload(text: str) -> Workload:
    return Workload.from_json(json.loads(text))


@functools.lru_cache(maxsize=1)
def warm_up_torch() -> None:
    """Pay torch's one-off lazy initialisation (about 1.5 s on the first SGD step)."""
    torch.set_num_threads(1)
    scratch = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(scratch.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(scratch(torch.zeros(1, 2)), torch.zeros(1).long()).backward()
    opt.step()


def train_locally(workload: Workload, site: int, server_round: int, arrays: ArrayRecord) -> Any:
    """``epochs`` epochs of plain SGD from the global weights; returns the state dict."""
    torch.set_num_threads(1)
    x_np, y_np = cached_site_data(workload.sites)[site]
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    model = cached_model(workload.hidden)
    model.load_state_dict(arrays.to_torch_state_dict())
    sgd_epochs(model, workload, x, y, site, server_round)
    return model.state_dict()


client_app = ClientApp()


@client_app.query()
def warm_up(msg: Message, context: Context) -> Message:
    """Setup, before round 1: the worker imports this module and caches data and model."""
    workload = parse_workload(str(msg.content["config"]["workload"]))
    cached_site_data(workload.sites)
    if not workload.noop:
        cached_model(workload.hidden)
        warm_up_torch()
    return Message(content=RecordDict(), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    workload = parse_workload(str(config["workload"]))
    site = int(context.node_config["partition-id"])
    n = len(cached_site_data(workload.sites)[site][1])
    arrays = msg.content["arrays"]
    if not workload.noop:
        arrays = ArrayRecord(train_locally(workload, site, int(config["server-round"]), arrays))
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=msg)


# --------------------------------------------------------------------------- server


class TimedFedAvg(FedAvg):
    """FedAvg that stamps when each round is configured and when it is aggregated."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.configured: list[float] = []
        self.aggregated: list[float] = []
        self.warmup_started = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.configured.append(time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        if result[0] is None:
            raise RuntimeError(f"round {server_round}: no site returned weights")
        self.aggregated.append(time.perf_counter())
        return result

    def round_seconds(self) -> list[float]:
        starts = [self.configured[0], *self.aggregated[:-1]]
        return [end - start for start, end in zip(starts, self.aggregated, strict=True)]


def make_server_app(workload: Workload, strategy: TimedFedAvg) -> ServerApp:
    app = ServerApp()

    config = ConfigRecord({"workload": json.dumps(workload.to_json())})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # Setup, not round 1: every simulated node registered, Ray's workers started and
        # warm (a query message to every node; each worker imports torch and this module).
        while len(nodes := list(grid.get_node_ids())) < workload.sites:
            time.sleep(0.01)
        strategy.warmup_started = time.perf_counter()
        replies = grid.send_and_receive(
            [
                Message(RecordDict({"config": config}), dst_node_id=node, message_type=QUERY)
                for node in nodes
            ]
        )
        if errors := [r.error.reason for r in replies if r.has_error()]:
            raise RuntimeError(f"warm-up failed on {len(errors)} nodes: {errors[0]}")
        torch.manual_seed(0)
        initial = ArrayRecord(build_model(workload.hidden).state_dict())
        strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=workload.rounds, train_config=config
        )

    return app


def run(workload: Workload) -> dict[str, Any]:
    strategy = TimedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=workload.sites,
        min_evaluate_nodes=0,
        min_available_nodes=workload.sites,
    )
    cpus = os.cpu_count() or 1
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "object_store_memory": OBJECT_STORE_BYTES,
            "logging_level": "ERROR",
            "log_to_driver": True,
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(workload, strategy),
            # This module's own ClientApp, imported by name, so that Ray's workers
            # unpickle references into the importable ``flower_run`` module.
            client_app=_importable().client_app,
            num_supernodes=workload.sites,
            backend_name="ray",
            backend_config=backend_config,
        )
    end = time.perf_counter()
    if len(strategy.aggregated) != workload.rounds:
        raise RuntimeError(
            f"Flower finished {len(strategy.aggregated)} of {workload.rounds} rounds"
        )
    return {
        "framework": "flower",
        "version": flwr.__version__,
        "workload": workload.to_json(),
        "round_seconds": strategy.round_seconds(),
        "wall_seconds": end - T0,
        "setup_seconds": strategy.configured[0] - T0,
        "warmup_seconds": strategy.configured[0] - strategy.warmup_started,
        "cpus": cpus,
    }


def _importable() -> Any:
    """This file as the module ``flower_run`` (not ``__main__``), for Ray's pickling."""
    if __name__ != "__main__":
        return sys.modules[__name__]
    peers = str(Path(__file__).resolve().parent)
    if peers not in sys.path:
        sys.path.insert(0, peers)
    import flower_run

    return flower_run


def main(argv: list[str] | None = None) -> int:
    return runner_main("flower", run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
