"""The aggregator as a real server: the same round loop as the simulation, over gRPC.

:func:`open_run` takes the workspace's state (``WORKSPACE/aggregator/``) for this
process and decides where to start: the latest unfinished run resumes from its last
finished round, otherwise a new run begins. :func:`serve` builds the
:class:`~fedloom.aggregator.Aggregator` from the plan, serves it with mutual TLS on
the workspace's PKI, records every round durably, publishes its live state for
``fedloom status``, keeps the server up until the connected sites have been told the
federation finished, and returns what happened. Sites connect to it; it never connects
to a site.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedloom.aggregator import Aggregator
from fedloom.aggregator.loop import with_spent
from fedloom.core.clock import FaultPoints
from fedloom.core.errors import Cancelled, StateError, TaskError, WorkspaceError
from fedloom.core.events import Event, Resume, RoundClosed
from fedloom.core.records import CloseReason, InstructionKind, RoundRecord
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights
from fedloom.pki import RevocationList, server_credentials
from fedloom.pki.common import CRL_FILE, load_cert, pki_dir_of
from fedloom.plan import Plan, plan_hash, validate_plan
from fedloom.privacy.aggregator import aggregator_privacy, spent_by_round
from fedloom.privacy.published import signer_from_pem
from fedloom.results import SimulationResult
from fedloom.runtime.executor import outside_rounds
from fedloom.runtime.federation import federation_config
from fedloom.runtime.sitedata import DataSource
from fedloom.store import save_weights
from fedloom.store.database import ENDED
from fedloom.store.locks import lock_state
from fedloom.store.runs import EventRow, RunInfo, RunStore, ended_as, event_row
from fedloom.strategies import build_strategy
from fedloom.tasks.base import Metrics, SiteContext, Task, metrics_of
from fedloom.tasks.dp_sgd import check_task_supports
from fedloom.tasks.loader import load_task
from fedloom.transport.grpc import GrpcServer, ServerSettings
from fedloom.transport.inprocess import TrafficCounter
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

    @property
    def silence_limit(self) -> float:
        return self.dead_after if self.dead_after is not None else 3 * self.heartbeat_seconds


@dataclass
class OpenedRun:
    """The workspace's state, held by this process: the run to serve and where it
    starts (``resume`` None: from round 1)."""

    store: RunStore
    run: RunInfo
    resume: Resume | None
    notes: list[str] = field(default_factory=list)
    lock: IO[str] | None = None
    # the start failed before the run opened a round: it is no longer recorded
    forgotten: bool = False

    def close(self) -> None:
        self.store.close()
        if self.lock is not None:
            self.lock.close()


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


def open_run(
    workspace: str | Path,
    plan: Plan,
    *,
    new_run: bool = False,
    run_dir: Callable[[], Path],
    run_name: str | None = None,
    keep_checkpoints: int = 3,
    faults: FaultPoints | None = None,
    test_set: bool = True,
) -> OpenedRun:
    """Lock the workspace's aggregator state and pick the run: the latest unfinished one
    resumes (its plan hash must match, and its name ``run_name`` if given), unless
    ``new_run``; otherwise a new run, whose folder ``run_dir()`` names. A damaged state
    is reported in ``notes``, never used. A run that finished (its final evaluation
    closed) but whose process died before its results were written has them written
    now, from its state, as the finished process would have (``test_set`` as in
    :class:`ServeOptions`)."""
    ws = Path(workspace).resolve()
    state_dir = state_dir_of(ws)
    lock = lock_state(state_dir)
    try:
        store = RunStore(state_dir, keep=keep_checkpoints, faults=faults)
    except BaseException:
        lock.close()
        raise
    try:
        code = WorkspaceCode.read(ws)  # hashed here, and loaded below from these same bytes
        digest = plan_hash(plan, code)
        latest = store.latest_run()
        if latest is not None and latest.status == "completed" and latest.run_dir.is_dir():
            _complete_results(store, latest, ws, test_set=test_set)  # unless removed on purpose
        if not new_run and latest is not None and latest.status not in ENDED:
            if latest.plan_hash != digest:
                raise StateError(
                    f"run {latest.name!r} is unfinished and was started with plan hash "
                    f"{latest.plan_hash[:16]}…; this plan's is {digest[:16]}…",
                    hint="start it with the plan (and overrides) it began with to resume it, "
                    "or pass --new-run to start afresh (the old run stays on disk)",
                )
            if run_name is not None and run_name != latest.name:
                raise StateError(
                    f"--run-name {run_name!r}: the unfinished run {latest.name!r} would resume",
                    hint="leave out --run-name to resume it, or pass --new-run",
                )
            strategy = build_strategy(plan.strategy.name, plan.strategy_params)
            task = load_task(code, plan.task)
            resume = store.resume(latest, lambda: strategy.init(task.init_weights(plan.seed)))
            if not _evaluated(resume, plan):
                return OpenedRun(store, latest, resume, store.notes, lock)
            # it ended after its final evaluation, before it could say so: it is done
            _complete_results(store, latest, ws, test_set=test_set, resume=resume)
            store.mark(latest, "completed")
            final = latest.run_dir / "final.safetensors"
            store.notes.append(
                f"run {latest.name!r} had finished (its final model is in {final}); "
                "a new run starts"
            )
        plan_json = json.dumps(plan.model_dump(mode="json"), sort_keys=True)
        path = run_dir()
        run = store.new_run(path.name, path, digest, plan_json)
        return OpenedRun(store, run, None, store.notes, lock)
    except BaseException:
        for note in store.notes:  # what was found before the refusal is not lost
            log.warning("state: %s", note)
        store.close()
        lock.close()
        raise


def _evaluated(resume: Resume, plan: Plan) -> bool:
    """Training ended (every round, or stopped early) and the final evaluation (if the
    plan has one) closed: it opens only once training is over."""
    if any(
        r.kind is InstructionKind.EVALUATE and r.close_reason is not CloseReason.STOPPED
        for r in resume.history
    ):
        return True
    return resume.next_round > plan.rounds and not plan.evaluation.final


def _results_written(run_dir: Path) -> bool:
    """The run folder has its final model and a summary that says the run completed
    (written last, atomically: see :meth:`RunRecorder.finish`)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (run_dir / "final.safetensors").exists() and summary.get("status") == "completed"


def test_context(plan: Plan) -> SiteContext:
    """The context of the aggregator's evaluation on the test set: its own best device
    (the plan's device is the sites' business)."""
    from fedloom.runtime.devices import resolve_device

    return outside_rounds(plan, "test", resolve_device("auto"))


def _complete_results(
    store: RunStore, run: RunInfo, ws: Path, *, test_set: bool, resume: Resume | None = None
) -> None:
    """Write a finished run's results if the process that finished it died first: the
    final model from the last checkpoint, the summary and metrics from the state
    database, the test metrics recomputed. They are what that process would have
    written, byte for byte (the plot aside)."""
    if _results_written(run.run_dir):
        return
    plan_json = store.plan_json(run)
    if resume is None:
        try:
            resume = store.resume(run, _no_initial_model)
        except _NoFinishedRound:
            return  # marked completed without a finished round: nothing to write
    if run.rebuilt or not plan_json or plan_json == "{}":
        # the database was rebuilt from the checkpoints: only the final model survives
        save_weights(run.run_dir / "final.safetensors", resume.state.weights)
        store.notes.append(
            f"run {run.name!r} finished but its results were never written: its final model "
            f"is now in {run.run_dir / 'final.safetensors'} (its per-site records were lost)"
        )
        return
    from fedloom.report import RunRecorder

    plan = validate_plan(json.loads(plan_json), source=f"the recorded plan of run {run.name!r}")
    privacy = aggregator_privacy(plan)
    history = list(resume.history)
    if privacy is not None:
        history = with_spent(history, spent_by_round(resume.state, privacy))
    # the test metrics come only from the code the run approved (never from code that
    # changed since: it is not even loaded)
    code = WorkspaceCode.read(ws)
    same_code = plan_hash(plan, code) == run.plan_hash
    stopped_early = None
    if privacy is not None and resume.next_round <= plan.rounds:  # as the run itself saw it
        stopped_early = privacy.stop_reason(resume.state)
    final = functools.partial(
        _final_result,
        plan,
        store,
        run,
        ws=ws,
        history=history,
        weights=resume.state.weights,
        stopped_early=stopped_early,
    )
    if not same_code:
        store.notes.append(
            f"run {run.name!r}: the code of {ws} changed since it ran, so its task was not "
            "loaded again; its summary has no test metrics, no primary metric and no plot"
        )
    metrics = None  # the task's declared metrics: from the code the run approved alone
    try:
        task = load_task(code, plan.task) if same_code else None
        metrics = metrics_of(task) if task is not None else None
        result = final(task=task if test_set else None, metrics=metrics)
    except (TaskError, ValueError, KeyError, TypeError) as err:  # the task's code, on the test set
        store.notes.append(
            f"run {run.name!r}: the test set could not be evaluated again ({err}); "
            "its summary has no test metrics"
        )
        result = final(task=None, metrics=metrics)
    recorder = RunRecorder.reopen(run.run_dir, history)
    recorder.finish(result)
    store.notes.append(
        f"run {run.name!r} finished but its results were never written: "
        f"they are now in {run.run_dir}"
    )


class _NoFinishedRound(Exception):
    pass


def _no_initial_model() -> StrategyState:
    raise _NoFinishedRound


def _final_result(
    plan: Plan,
    store: RunStore,
    run: RunInfo,
    *,
    task: Task | None,
    metrics: Metrics | None,
    ws: Path,
    history: list[RoundRecord],
    weights: Weights,
    stopped_early: str | None,
) -> SimulationResult:
    """What a finished run leaves: its history, final model and test metrics (None for
    ``task``: none), by the task's declared ``metrics`` (None: unknown), with the
    seconds and bytes the state database recorded (those of every process that served
    it, up to its last round's close)."""
    test: dict[str, float] = {}
    if task is not None and plan.data.dataset != "custom":
        test_data = DataSource(plan, ws, task).test_set()
        out = task.evaluate(weights, test_data, test_context(plan))
        test = {k: float(v) for k, v in out.metrics.items()}
    totals = store.reload(run)
    return SimulationResult(
        plan=plan,
        plan_hash=run.plan_hash,
        history=tuple(history),
        final_weights=weights,
        test_metrics=test,
        centralized_metrics=None,
        wall_seconds=totals.elapsed,
        bytes_sent=totals.bytes_sent,
        bytes_received=totals.bytes_received,
        attackers=(),
        stopped_early=stopped_early,
        metrics=metrics,
    )


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
                status = ended_as(err)
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
    task = load_task(code, plan.task)
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
        # a run rebuilt from its checkpoints lost its attempt numbers: its task ids differ
        # from every earlier one, so no answer sent before the rebuild can match
        run_id=run.run_id + ("r" if run.rebuilt else ""),
        dead_after=options.silence_limit,
    )
    journal = store.journal(run, lambda: (traffic.sent, traffic.received), rounds=plan.rounds)
    aggregator = Aggregator(
        config,
        build_strategy(plan.strategy.name, plan.strategy_params),
        # the strategy keeps its own copy of the initial model: no second one here
        resume.state.weights if resume is not None else task.init_weights(plan.seed),
        on_event=sink,
        spool_dir=state_dir_of(ws),
        journal=journal,
        resume=resume,
        faults=faults,
        privacy=aggregator_privacy(plan, load_cert(credentials.ca_pem, "CA certificate")),
        signer=signer_from_pem(credentials.key_pem),
    )
    settings = ServerSettings(
        address=address_of(options.host, options.port),
        plan_hash=digest,
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
        result = _final_result(
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
