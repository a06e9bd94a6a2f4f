"""The workspace's aggregator state (``WORKSPACE/aggregator/``), taken by this process:
:func:`open_run` locks it and decides where the server starts: the latest unfinished
run resumes from its last finished round, otherwise a new run begins."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedloom.core.clock import FaultPoints
from fedloom.core.errors import StateError
from fedloom.core.events import Resume
from fedloom.core.records import CloseReason, InstructionKind
from fedloom.deployment.finished import complete_results
from fedloom.plan import Plan, plan_hash
from fedloom.plan.tasks import plan_task
from fedloom.store.database import ENDED
from fedloom.store.locks import lock_state
from fedloom.store.runs import RunInfo, RunStore
from fedloom.strategies import build_strategy
from fedloom.workspace import WorkspaceCode

log = logging.getLogger("fedloom.aggregator")


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
    :class:`~fedloom.deployment.server.ServeOptions`)."""
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
            complete_results(store, latest, ws, test_set=test_set)  # unless removed on purpose
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
            task = plan_task(code, plan)
            resume = store.resume(latest, lambda: strategy.init(task.init_weights(plan.seed)))
            if not _evaluated(resume, plan):
                return OpenedRun(store, latest, resume, store.notes, lock)
            # it ended after its final evaluation, before it could say so: it is done
            complete_results(store, latest, ws, test_set=test_set, resume=resume)
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
