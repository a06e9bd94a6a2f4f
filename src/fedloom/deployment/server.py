"""The aggregator as a real server: the same round loop as the simulation, over gRPC.

:func:`serve` builds the :class:`~fedloom.aggregator.Aggregator` from the plan, serves
the run that :func:`~fedloom.deployment.resume.open_run` took (new or resumed) with mutual
TLS on the workspace's PKI, records every round durably, publishes its live state for
``fedloom status``, keeps the server up until the connected sites have been told the
federation finished, and returns what happened. Sites connect to it; it never connects
to a site.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedloom.aggregator import Aggregator
from fedloom.core.clock import FaultPoints
from fedloom.core.errors import Cancelled, WorkspaceError
from fedloom.core.events import Event, RoundClosed
from fedloom.core.weights import Weights
from fedloom.deployment.finished import final_result
from fedloom.deployment.resume import OpenedRun, state_dir_of
from fedloom.pki import RevocationList, server_credentials
from fedloom.pki.common import CRL_FILE, load_cert, pki_dir_of
from fedloom.plan import Plan, plan_covers, plan_hash
from fedloom.plan.tasks import plan_task
from fedloom.privacy.aggregator import aggregator_privacy
from fedloom.privacy.published import signer_from_pem
from fedloom.results import SimulationResult
from fedloom.runtime.federation import federation_config
from fedloom.store.model_file import given_model, plan_initial
from fedloom.store.runs import EventRow, RunInfo, RunStore, ended_as, event_row
from fedloom.strategies import build_strategy
from fedloom.tasks.base import Metrics, Task, metrics_of
from fedloom.tasks.dp_sgd import check_task_supports
from fedloom.transport.grpc import GrpcServer, ServerSettings
from fedloom.transport.traffic import TrafficCounter
from fedloom.workspace import WorkspaceCode

log = logging.getLogger("fedloom.aggregator")


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    host: str = "0.0.0.0"  # noqa: S104 - an aggregator serves sites on other machines
    port: int = 7171
    heartbeat_seconds: float = 5.0
    dead_after: float | None = None  # drop a silent site after this (default 3 heartbeats)
    linger_seconds: float = 10.0  # after the last round, time for sites to hear "finished"
    test_set: bool = True  # evaluate the final model on a built-in dataset's test set
    live_seconds: float = 1.0  # how often the live state for `fedloom status` is written
    # evaluate this model at every site, no training (`fedloom evaluate`); such a run is
    # never resumed: one that ends early is recorded as cancelled
    model: Mapping[str, np.ndarray] | None = None

    @property
    def silence_limit(self) -> float:
        return self.dead_after if self.dead_after is not None else 3 * self.heartbeat_seconds


EventSink = Callable[[Event, TrafficCounter], None]

STOP_LINGER = 2.0  # seconds a stopping aggregator gives waiting sites to hear it


def address_of(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:7171``)."""
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def serve(
    workspace: str | Path,
    plan: Plan,
    opened: OpenedRun,
    options: ServeOptions = ServeOptions(),
    *,
    on_event: EventSink | None = None,
    on_listening: Callable[[int], None] | None = None,
    on_metrics: Callable[[Metrics], None] | None = None,
    on_finished: Callable[[SimulationResult], object] | None = None,
    faults: FaultPoints | None = None,
) -> SimulationResult:
    """Run (or resume) the plan's federation with real collaborators; returns when it is
    done. The run's status in the state is ``running`` meanwhile, and set on the way
    out: completed (once the last round closed and ``on_finished`` wrote the results),
    interrupted (Ctrl-C, SIGTERM), cancelled (:class:`~fedloom.core.errors.Cancelled`) or
    failed. A run that fails before it opened a round
    (the port taken, the task not loading) is removed from the state instead
    (``opened.forgotten``): the next start has nothing to resume, and begins afresh."""
    opened.store.mark(opened.run, "running")
    try:
        return _serve(
            workspace,
            plan,
            opened,
            options,
            on_event=on_event,
            on_listening=on_listening,
            on_metrics=on_metrics,
            on_finished=on_finished,
            faults=faults,
        )
    except BaseException as err:
        try:
            if opened.store.forget_unopened(opened.run):
                opened.forgotten = True
            elif opened.store.reload(opened.run).status != "completed":  # never undo a finish
                status = ended_as(err) if options.model is None else "cancelled"
                opened.store.mark(opened.run, status, str(err) or type(err).__name__)
        except Exception as also:  # noqa: BLE001 - a full disk refuses this too: err says why
            log.warning("could not record how the run ended: %s", also)
        raise


def _serve(
    workspace: str | Path,
    plan: Plan,
    opened: OpenedRun,
    options: ServeOptions,
    *,
    on_event: EventSink | None,
    on_listening: Callable[[int], None] | None,
    on_metrics: Callable[[Metrics], None] | None,
    on_finished: Callable[[SimulationResult], object] | None,
    faults: FaultPoints | None,
) -> SimulationResult:
    ws = Path(workspace).resolve()
    faults = faults or FaultPoints()
    digest = opened.run.plan_hash  # open_run checked it against this plan
    code = WorkspaceCode.read(ws)  # the code the task runs is the code that was hashed
    if plan_hash(plan, code) != digest:
        raise WorkspaceError(
            f"the code of {ws} changed after the run was opened (plan hash {digest[:16]}…)",
            hint="start the aggregator again once the workspace holds the approved code",
        )
    task = plan_task(code, plan)
    check_task_supports(task, plan.privacy.dp_sgd is not None)
    if on_metrics is not None:
        on_metrics(metrics_of(task))
    credentials = server_credentials(pki_dir_of(ws))
    revocations = RevocationList(pki_dir_of(ws) / CRL_FILE, credentials.ca_pem)
    traffic = TrafficCounter()
    store, run = opened.store, opened.run

    events: queue.SimpleQueue[EventRow] = queue.SimpleQueue()

    def sink(event: Event) -> None:
        events.put(event_row(event))  # written with the live state, once a second
        if isinstance(event, RoundClosed) and event.record.privacy:
            spent = event.record.privacy
            log.info(
                "round %d: epsilon %.4g spent at delta %g (%s accountant; noise multiplier "
                "%.3g, clip %.3g)",
                event.record.round,
                spent.get("epsilon", 0.0),
                spent.get("delta", 0.0),
                str(spent.get("accountant", "")).upper(),
                spent.get("noise_multiplier", 0.0),
                spent.get("clip", 0.0),
            )
        if on_event is not None:
            on_event(event, traffic)

    resume = opened.resume
    config = dataclasses.replace(
        federation_config(plan),
        # a run rebuilt from its checkpoints lost its attempt numbers: its attempt ids differ
        # from every earlier one, so no answer sent before the rebuild can match
        run_id=run.run_id + ("r" if run.rebuilt else ""),
        dead_after=options.silence_limit,
    )
    journal = store.journal(run, lambda: (traffic.sent, traffic.received), rounds=plan.rounds)
    aggregator = Aggregator(
        config,
        build_strategy(plan.strategy.name, plan.strategy_params),
        # the strategy keeps its own copy of the initial model: no second one here
        resume.state.weights if resume is not None else initial_model(task, plan, options, ws),
        on_event=sink,
        spool_dir=state_dir_of(ws),
        journal=journal,
        resume=resume,
        faults=faults,
        privacy=aggregator_privacy(plan, load_cert(credentials.ca_pem, "CA certificate")),
        signer=signer_from_pem(credentials.key_pem),
        evaluate_only=options.model is not None,
    )
    settings = ServerSettings(
        address=address_of(options.host, options.port),
        plan_hash=digest,
        plan_covers=plan_covers(plan, code),
        federation=plan.name,
        rounds=plan.rounds,
        roster=frozenset(plan.roster),
        heartbeat_seconds=options.heartbeat_seconds,
        certificate=credentials.cert_pem,
    )
    server = GrpcServer(aggregator, credentials, settings, revocations=revocations, traffic=traffic)
    live = _LiveState(store, run, aggregator, events, options.live_seconds)
    completed = cancelled = False
    try:
        port = server.start()
        live.start()
        if on_listening is not None:
            on_listening(port)
        history = aggregator.run()
        completed = True
        if aggregator.stopped_early is not None:
            log.warning("%s", aggregator.stopped_early)
        faults.hit("run.evaluated", round=plan.rounds + 1)
        # the results are written before the run is marked completed: a process killed
        # in between leaves a run whose next start writes them (see open_run)
        result = final_result(
            plan,
            store,
            run,
            task=task if options.test_set else None,
            metrics=metrics_of(task),
            ws=ws,
            history=history,
            weights=aggregator.weights,
            stopped_early=aggregator.stopped_early,
        )
        if on_finished is not None:
            on_finished(result)
        faults.hit("run.written", round=plan.rounds + 1)
        store.mark(run, "completed")
        faults.hit("run.completed", round=plan.rounds + 1)
    except Cancelled:
        cancelled = True
        raise
    finally:
        live.stop()
        # Sites waiting for work hear how it ended: completed (they stop), cancelled
        # (they stop), or stopped before it completed (they wait for the aggregator to
        # come back); those busy at a stop find it gone and retry until it is back.
        told = options.linger_seconds if completed or cancelled else STOP_LINGER
        try:
            server.wait_told_finished(told)
        except KeyboardInterrupt:
            if not completed:
                raise  # after the last round, Ctrl-C only cuts the wait short
        finally:
            server.stop(grace=1.0)
    return result


def initial_model(task: Task, plan: Plan, options: ServeOptions, ws: Path) -> Weights:
    """The task's initial model, the plan's ``model.initial`` or the model given to
    evaluate (either checked against the task's)."""
    initial = task.init_weights(plan.seed)
    if options.model is not None:
        return given_model(initial, options.model)
    return plan_initial(initial, plan, ws)


class _LiveState:
    """Writes the aggregator's snapshot to the state database every ``every`` seconds,
    for ``fedloom status``; a failed write is logged and retried, never fatal."""

    def __init__(
        self,
        store: RunStore,
        run: RunInfo,
        aggregator: Aggregator,
        events: queue.SimpleQueue[EventRow],
        every: float,
    ):
        self._store, self._run, self._aggregator = store, run, aggregator
        self._events = events
        self._unwritten: list[EventRow] = []
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedloom-live", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._write()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self._write()

    def _write(self) -> None:
        rows, self._unwritten = self._unwritten, []
        while not self._events.empty():
            rows.append(self._events.get())
        try:
            self._store.write_live(self._run, self._aggregator.snapshot(), rows)
        except Exception as err:  # noqa: BLE001 - status is a convenience, the run goes on
            log.warning("could not write the live state: %s", err)
            self._unwritten = rows[-10_000:]  # tried again next time (the newest kept)
