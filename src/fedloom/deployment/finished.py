"""What a finished run leaves: its result (history, final model, test metrics, the
seconds and bytes the state database recorded), and, for a run whose process died
after its last round but before writing them, the results written from its state."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fedloom.aggregator.loop import with_spent
from fedloom.core.errors import TaskError
from fedloom.core.events import Resume
from fedloom.core.records import RoundRecord
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights
from fedloom.plan import Plan, plan_hash, validate_plan
from fedloom.plan.tasks import plan_task
from fedloom.privacy.aggregator import aggregator_privacy, spent_by_round
from fedloom.results import SimulationResult
from fedloom.runtime.executor import outside_rounds
from fedloom.runtime.sitedata import DataSource
from fedloom.store import save_weights
from fedloom.store.runs import RunInfo, RunStore
from fedloom.strategies.scaffold import model_part
from fedloom.tasks.base import Metrics, SiteContext, Task, metrics_of
from fedloom.workspace import WorkspaceCode


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


def complete_results(
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
        save_weights(run.run_dir / "final.safetensors", model_part(resume.state.weights))
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
        history = with_spent(history, spent_by_round(resume.state.ledger, privacy))
    # the test metrics come only from the code the run approved (never from code that
    # changed since: it is not even loaded)
    code = WorkspaceCode.read(ws)
    same_code = plan_hash(plan, code) == run.plan_hash
    stopped_early = None
    if privacy is not None and resume.next_round <= plan.rounds:  # as the run itself saw it
        stopped_early = privacy.stop_reason(resume.state.ledger)
    final = functools.partial(
        final_result,
        plan,
        store,
        run,
        ws=ws,
        history=history,
        weights=model_part(resume.state.weights),
        stopped_early=stopped_early,
    )
    if not same_code:
        store.notes.append(
            f"run {run.name!r}: the code of {ws} changed since it ran, so its task was not "
            "loaded again; its summary has no test metrics, no primary metric and no plot"
        )
    metrics = None  # the task's declared metrics: from the code the run approved alone
    try:
        task = plan_task(code, plan) if same_code else None
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


def final_result(
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
