"""The simulation runtime: one aggregator, many simulated sites, one machine.

Sites talk to the aggregator through the in-process transport (optionally through
the wire format), exactly as real collaborators would; their local work runs in a
pool of ``workers`` processes. Each worker is driven by one thread that takes the
next site with work from a queue filled when a round opens: no polling anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedloom.aggregator import Aggregator
from fedloom.attacks import Attack
from fedloom.collaborator import Collaborator
from fedloom.compression.site import site_compression
from fedloom.core.clock import Clock, FaultPoints
from fedloom.core.errors import TaskError, TaskFailed, WorkspaceError
from fedloom.core.events import Event, RoundOpened
from fedloom.core.records import Instruction, RoundRecord, SiteAnswer
from fedloom.core.weights import Weights, nbytes
from fedloom.figures import metrics_from_json
from fedloom.plan import Plan, plan_hash
from fedloom.privacy.aggregator import aggregator_privacy
from fedloom.privacy.site import site_privacy
from fedloom.results import SimulationResult, SiteFailed
from fedloom.runtime.federation import federation_config
from fedloom.simulation.attack_setup import make_attack
from fedloom.simulation.dispatch import Dispatcher, batch_size
from fedloom.simulation.options import SimulationOptions
from fedloom.simulation.pool import start_workers
from fedloom.simulation.replies import raise_reply_error
from fedloom.simulation.worker import LocalWorker
from fedloom.simulation.workerops import WorkerOp, attack_to_json, request
from fedloom.store.model_file import given_model, plan_initial
from fedloom.strategies import build_strategy, check_strategy
from fedloom.strategies.base import Strategy
from fedloom.tasks.base import Metrics
from fedloom.transport.inprocess import InProcessTransport
from fedloom.transport.messages import FailureReport
from fedloom.transport.traffic import TrafficCounter

log = logging.getLogger("fedloom.simulation")


ProgressSink = Callable[[Event, TrafficCounter], None]
FailureSink = Callable[[SiteFailed], None]
MetricsSink = Callable[[Metrics], None]


def simulate(
    workspace: str | Path,
    plan: Plan,
    options: SimulationOptions = SimulationOptions(),
    *,
    on_event: ProgressSink | None = None,
    on_failure: FailureSink | None = None,
    clock: Clock | None = None,
    faults: FaultPoints | None = None,
    on_metrics: MetricsSink | None = None,
    strategy: Strategy | None = None,
) -> SimulationResult:
    """Run the plan's federation on this machine and return what happened.

    ``strategy`` is an object of the user's own that follows the
    :class:`~fedloom.strategies.Strategy` protocol (it may subclass or wrap a built-in
    one); it aggregates instead of the plan's ``strategy`` section, and what its
    ``configure`` returns is what the sites are told. It runs at the aggregator only: the
    worker processes load the task, never the strategy.

    A site whose local work fails is logged (``fedloom.simulation``, with the task's
    traceback) and handed to ``on_failure`` before the aggregator hears of it; the
    federation goes on as the plan's quorum allows. With ``workers=0`` every task runs
    in the calling thread (a debugger stops in it) and the round loop in another.
    ``on_metrics`` hears the task's declared metrics once a worker loaded it."""
    ws = Path(workspace).resolve()
    digest = plan_hash(plan, ws)
    attack = make_attack(plan, options)
    custom = strategy is not None
    if strategy is None:
        strategy = build_strategy(plan.strategy.name, plan.strategy_params)
    else:
        check_strategy(strategy)
    plan_json = json.dumps(plan.model_dump(mode="json"))
    attack_json = json.dumps(attack_to_json(attack))
    scratch = None
    if options.state_root is None:
        scratch = tempfile.TemporaryDirectory(prefix="fedloom-sites-")
        options = dataclasses.replace(options, state_root=Path(scratch.name))
    try:
        result = _simulate(
            ws,
            plan,
            options,
            digest,
            attack,
            strategy,
            plan_json,
            attack_json,
            on_event,
            on_failure,
            clock,
            faults,
            on_metrics,
        )
        return dataclasses.replace(result, strategy=strategy.name) if custom else result
    finally:
        if scratch is not None:
            scratch.cleanup()


def _simulate(
    ws: Path,
    plan: Plan,
    options: SimulationOptions,
    digest: str,
    attack: Attack | None,
    strategy: Strategy,
    plan_json: str,
    attack_json: str,
    on_event: ProgressSink | None,
    on_failure: FailureSink | None,
    clock: Clock | None,
    faults: FaultPoints | None,
    on_metrics: MetricsSink | None,
) -> SimulationResult:
    config = federation_config(plan)
    if options.sites is not None:  # a coalition of the plan's sites
        unknown = sorted(set(options.sites) - set(plan.roster))
        if unknown or not options.sites:
            raise WorkspaceError(
                f"the sites taking part must be some of the plan's {list(plan.roster)}; "
                f"got {list(options.sites)}"
            )
        coalition = tuple(s for s in plan.roster if s in options.sites)
        sites_per_round = min(config.sites_per_round, len(coalition))
        config = dataclasses.replace(config, roster=coalition, sites_per_round=sites_per_round)
    per_round = config.sites_per_round
    workers = start_workers(str(ws), plan_json, attack_json, options, plan, digest)
    try:
        init_header, initial = workers[0].call(request(WorkerOp.INIT))
        raise_reply_error(init_header, "the task's init_weights failed")
        if initial is None:
            raise TaskError("the task's init_weights returned no weights")
        if init_header.get("plan_hash", digest) != digest:
            raise WorkspaceError(
                f"the code of {ws} changed while the simulation started: the plan hash "
                f"is {digest[:16]}… here and {init_header['plan_hash'][:16]}… in the worker",
                hint="run it again once the workspace's files stay put",
            )
        metrics = metrics_from_json(init_header.get("metrics"))
        if on_metrics is not None:
            on_metrics(metrics)
        check_header, _ = workers[0].call(request(WorkerOp.CHECK, site=plan.roster[0]), initial)
        raise_reply_error(check_header, f"{plan.roster[0]}'s data does not fit the task")
        if options.model is not None:  # evaluated as it is: it replaces the initial model
            initial = given_model(initial, options.model)
        else:
            initial = plan_initial(initial, plan, ws)
        before = None
        if options.test_initial:
            reply = workers[0].call(request(WorkerOp.TEST, key="init"), initial)
            before = _metrics(reply, "evaluating the initial model on the test set")
        sites: queue.SimpleQueue[str | None] = queue.SimpleQueue()

        def sink(event: Event) -> None:  # events come only from aggregator.run(), below
            if isinstance(event, RoundOpened):
                for site in event.selected:
                    sites.put(site)
            if on_event is not None:
                on_event(event, transport.traffic)

        # Simulated sites queue for the workers; each one gets the plan's round_seconds
        # once it is running, so the round as a whole gets that many turns.
        turns = math.ceil(per_round / len(workers))
        config = dataclasses.replace(config, round_deadline=config.round_deadline * turns)
        aggregator = Aggregator(
            config,
            strategy,
            initial,  # strategy.init keeps its own copy
            clock=clock,
            faults=faults,
            on_event=sink,
            privacy=aggregator_privacy(plan),
            evaluate_only=options.model is not None,
        )
        transport = InProcessTransport(aggregator, roundtrip=options.roundtrip)
        # Sites wait for the workers in batches (see simulation/dispatch.py); enough site
        # threads that a batch fills while the previous one's updates are folded.
        # Secure aggregation's key exchange waits for every site of the round, so each
        # needs its own thread then.
        batch = batch_size(per_round, len(workers), nbytes(initial))
        if not options.baseline:
            initial = {}  # the strategy holds its own copy: a model's size less to keep
        here = isinstance(workers[0], LocalWorker)  # --workers 0: tasks in this thread
        dispatcher = Dispatcher(workers, batch, aggregator.attempt_open, in_caller=here)
        # one site ahead of each worker; with batches, a second batch per worker
        ahead = 2 * batch * len(workers) if batch > 1 else len(workers) + 1
        threads = per_round if plan.privacy.secure_aggregation else min(per_round, ahead)
        work = dispatcher.run

        busy: set[str] = set()  # sites a driver is working on
        asked_again: set[str] = set()  # ... and that a retried round asked for meanwhile
        busy_lock = threading.Lock()

        def drive() -> None:
            while (site := sites.get()) is not None:
                with busy_lock:
                    if site in busy:
                        asked_again.add(site)
                        continue
                    busy.add(site)
                try:
                    run_site(site)
                finally:
                    with busy_lock:
                        busy.discard(site)
                        if site in asked_again:
                            asked_again.discard(site)
                            sites.put(site)

        compression = site_compression(plan)  # one for every site: keeps each one's residual

        def runner(site: str, instruction: Instruction, weights: Weights) -> SiteAnswer:
            try:
                return work(site, instruction, weights)
            except Exception as err:
                if aggregator.attempt_open(instruction.attempt_id):  # else nobody hears of it
                    _failed(site, instruction, err, on_failure)
                raise

        def run_site(site: str) -> None:
            collaborator = Collaborator(
                transport.connect(site),
                lambda ins, w: runner(site, ins, w),
                privacy=site_privacy(plan, site),
                compression=compression,
            )
            try:
                outcome = collaborator.step(timeout=0)
            except Exception as err:  # never lose a driver: the site fails, not the run
                if collaborator.current is not None:
                    reason = f"{type(err).__name__}: {err}"
                    current = collaborator.current
                    report = FailureReport(current.round, reason, current.attempt_id)
                    collaborator.connection.report_failure(report)
                return
            receipt, done = outcome.receipt, outcome.instruction
            if receipt is not None and receipt.resend and done is not None:
                # An upload in this process cannot break on its way: the aggregator's own
                # error broke it, and sending it again would meet that again. The site
                # fails the round now, instead of the round waiting for its deadline.
                _failed(site, done, TaskError(receipt.reason), on_failure)
                report = FailureReport(done.round, receipt.reason, done.attempt_id)
                collaborator.connection.report_failure(report)

        started = time.perf_counter()
        pool = ThreadPoolExecutor(threads, thread_name_prefix="fedloom-site")
        futures = [pool.submit(drive) for _ in range(threads)]
        completed = False
        try:
            history = _rounds(aggregator, dispatcher) if here else aggregator.run()
            completed = True
        finally:
            for _ in range(threads):
                sites.put(None)
            if not completed:  # stopped or failed: don't wait for tasks still running
                dispatcher.abort()
                for w in workers:
                    w.abort()
            try:
                pool.shutdown(wait=True)
            finally:
                dispatcher.close()
        for f in futures:
            f.result()
        wall = time.perf_counter() - started
        final = aggregator.weights
        test = _metrics(
            workers[0].call(request(WorkerOp.TEST, key="final"), final),
            "evaluating on the test set",
        )
        central = None
        if options.baseline:
            central = _metrics(
                workers[0].call(request(WorkerOp.BASELINE, key="init"), initial),
                "training the centralised baseline",
            )
        return SimulationResult(
            plan=plan,
            plan_hash=digest,
            history=tuple(history),
            final_weights=final,
            test_metrics=test,
            initial_test_metrics=before,
            centralized_metrics=central,
            wall_seconds=wall,
            bytes_sent=transport.traffic.sent,
            bytes_received=transport.traffic.received,
            attackers=tuple(sorted(attack.attackers)) if attack else (),
            stopped_early=aggregator.stopped_early,
            metrics=metrics,
            model_bytes=_model_bytes(init_header),
        )
    finally:
        for w in workers:
            w.close()


def _failed(
    site: str, instruction: Instruction, err: Exception, on_failure: FailureSink | None
) -> None:
    """Log a site's failed work (with the task's traceback) and hand it on."""
    reason = err.message if isinstance(err, TaskError) else f"{type(err).__name__}: {err}"
    trace = err.traceback if isinstance(err, TaskFailed) else ""
    failed = SiteFailed(site, instruction.round, instruction.attempt_id, reason, trace)
    if trace:
        log.warning("%s, round %d: the task failed: %s\n%s", site, failed.round, reason, trace)
    else:
        log.warning("%s, round %d: %s", site, failed.round, reason)
    if on_failure is not None:
        on_failure(failed)


def _rounds(aggregator: Aggregator, dispatcher: Dispatcher) -> list[RoundRecord]:
    """The aggregator's rounds run in a thread while this thread runs the sites' tasks
    (``--workers 0``: a debugger's breakpoint in a task stops in the main thread). Ctrl-C
    here stops the round loop there, as it would have stopped it here."""
    box: dict[str, Any] = {}

    def loop() -> None:
        try:
            box["history"] = aggregator.run()
        except BaseException as err:  # raised in this thread, below
            box["error"] = err
        finally:
            dispatcher.stop_serving()

    thread = threading.Thread(target=loop, name="fedloom-rounds", daemon=True)
    thread.start()
    try:
        dispatcher.serve_here()
    except BaseException:
        aggregator.interrupt()
        raise
    finally:
        dispatcher.abort()  # work queued from here on is stale: failed, not waited for
        thread.join()
    if "error" in box:
        raise box["error"]
    history: list[RoundRecord] = box["history"]
    return history


def _model_bytes(init_header: dict[str, Any]) -> int | None:
    """The whole model's bytes, when the task told its worker (a LoRA adapter's base)."""
    size = init_header.get("model_bytes")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _metrics(reply: tuple[dict[str, Any], Any], doing: str) -> dict[str, float]:
    header, _ = reply
    raise_reply_error(header, f"{doing} failed")
    return {k: float(v) for k, v in header["metrics"].items()}
