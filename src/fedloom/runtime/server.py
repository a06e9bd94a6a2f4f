"""The aggregator as a real server: the same round loop as the simulation, over gRPC.

:func:`serve` builds the :class:`~fedloom.orchestration.Aggregator` from the plan,
serves it with mutual TLS on the workspace's PKI, runs every round, keeps the server
up until the connected sites have been told the federation finished, and returns what
happened. Sites connect to it; it never connects to a site.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedloom.orchestration import Aggregator, Event
from fedloom.pki import RevocationList, server_credentials
from fedloom.pki.common import CRL_FILE, pki_dir_of
from fedloom.plan import Plan, plan_hash
from fedloom.runtime.simulation import SimulationResult, federation_config
from fedloom.runtime.sitedata import DataSource
from fedloom.strategies import build_strategy
from fedloom.tasks.loader import load_task
from fedloom.transport.grpc import GrpcServer, ServerSettings
from fedloom.transport.inprocess import TrafficCounter


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    host: str = "0.0.0.0"  # noqa: S104 - an aggregator serves sites on other machines
    port: int = 7171
    heartbeat_seconds: float = 5.0
    linger_seconds: float = 10.0  # after the last round, time for sites to hear "finished"
    test_set: bool = True  # evaluate the final model on a built-in dataset's test set


EventSink = Callable[[Event, TrafficCounter], None]

STOP_LINGER = 2.0  # seconds a stopping aggregator gives waiting sites to hear it


def address_of(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:7171``)."""
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def state_dir_of(workspace: Path) -> Path:
    """The aggregator's folder in a workspace: its log, and rollback spools of updates."""
    path = Path(workspace) / "aggregator"
    path.mkdir(parents=True, exist_ok=True)
    return path


def serve(
    workspace: str | Path,
    plan: Plan,
    options: ServeOptions = ServeOptions(),
    *,
    on_event: EventSink | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Run the plan's federation with real collaborators; returns when it is done."""
    ws = Path(workspace).resolve()
    digest = plan_hash(plan, ws)
    task = load_task(ws, plan.task)
    credentials = server_credentials(pki_dir_of(ws))
    revocations = RevocationList(pki_dir_of(ws) / CRL_FILE, credentials.ca_pem)
    traffic = TrafficCounter()

    def sink(event: Event) -> None:
        if on_event is not None:
            on_event(event, traffic)

    aggregator = Aggregator(
        federation_config(plan),
        build_strategy(plan.strategy.name, plan.strategy_params),
        task.init_weights(plan.seed),  # the strategy keeps its own copy: no second one here
        on_event=sink,
        spool_dir=state_dir_of(ws),
    )
    settings = ServerSettings(
        address=address_of(options.host, options.port),
        plan_hash=digest,
        federation=plan.name,
        rounds=plan.rounds,
        roster=frozenset(plan.roster),
        heartbeat_seconds=options.heartbeat_seconds,
    )
    server = GrpcServer(aggregator, credentials, settings, revocations=revocations, traffic=traffic)
    completed = False
    try:
        port = server.start()
        if on_listening is not None:
            on_listening(port)
        started = time.perf_counter()
        history = aggregator.run()
        wall = time.perf_counter() - started
        completed = True
    finally:
        # Sites waiting for work hear how it ended (finished, or stopped early); those
        # busy at a stop find the aggregator gone and retry until it is back.
        server.wait_told_finished(options.linger_seconds if completed else STOP_LINGER)
        server.stop(grace=1.0)
    test: dict[str, float] = {}
    if options.test_set and plan.data.dataset != "custom":
        source = DataSource(plan, ws, task)
        x, y = source.test_set()
        test = {k: float(v) for k, v in task.evaluate(aggregator.weights, x, y).metrics.items()}
    return SimulationResult(
        plan=plan,
        plan_hash=digest,
        history=tuple(history),
        final_weights=aggregator.weights,
        test_metrics=test,
        centralized_metrics=None,
        wall_seconds=wall,
        bytes_sent=traffic.sent,
        bytes_received=traffic.received,
        attackers=(),
    )
