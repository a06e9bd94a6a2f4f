"""The task a plan runs at a site: the workspace's own, or, for an analysis plan, the
built-in :class:`~fedloom.analysis.StatisticsTask`."""

from __future__ import annotations

from typing import Any

from fedloom.analysis import StatisticsTask
from fedloom.plan.schema import Plan
from fedloom.tasks.loader import load_task
from fedloom.workspace import WorkspaceCode


def plan_task(code: WorkspaceCode, plan: Plan, digest: str | None = None) -> Any:
    """The plan's task, loaded from ``code`` (``digest``: the plan's hash, computed
    when not given)."""
    if plan.analysis is None:
        return load_task(code, plan.task, plan.model_source(code.root))
    from fedloom.plan import plan_hash

    sa = plan.privacy.secure_aggregation
    return StatisticsTask(
        plan.analysis,
        plan_hash=digest or plan_hash(plan, code),
        accountant=plan.privacy.accountant,
        clip_range=None if sa is None else sa.clip_range,
    )
