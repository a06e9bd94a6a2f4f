"""fedloom: federated learning across organisations. The model travels; the data stays.

The names below are the public Python API: tasks, plan loading, ``simulate``, the
``Strategy`` protocol and the strategy registry, results and the errors a user meets.
Everything else (the round loop, accumulators, transports, clocks) is internal, may
change, and is imported from its own module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (fedloom starts fast)
    from fedloom.core.errors import (
        AggregationError,
        FedloomError,
        PlanError,
        QuorumError,
        TaskError,
        WorkspaceError,
    )
    from fedloom.core.records import EvalOutput, RoundRecord, TrainOutput, TrainSettings
    from fedloom.core.state import StrategyState
    from fedloom.core.weights import Weights
    from fedloom.plan import Plan, load_plan, plan_hash
    from fedloom.results import SimulationResult
    from fedloom.simulation.options import SimulationOptions
    from fedloom.simulation.run import simulate
    from fedloom.strategies import STRATEGIES, build_strategy
    from fedloom.strategies.base import Strategy
    from fedloom.tasks import NumpyTask, SiteContext, SiteData, SoftmaxRegression, Task, TorchTask
    from fedloom.templates import create_workspace

from fedloom.core.version import __version__  # noqa: E402 - after the lazy table's imports

# where each public name lives: ``import fedloom`` loads none of these modules until a
# name is used (``TorchTask`` imports torch only then), so the command line and the
# worker processes start in a fraction of the time
_PUBLIC = {
    "AggregationError": "fedloom.core.errors",
    "EvalOutput": "fedloom.core.records",
    "FedloomError": "fedloom.core.errors",
    "NumpyTask": "fedloom.tasks",
    "Plan": "fedloom.plan",
    "PlanError": "fedloom.core.errors",
    "QuorumError": "fedloom.core.errors",
    "RoundRecord": "fedloom.core.records",
    "STRATEGIES": "fedloom.strategies",
    "SimulationOptions": "fedloom.simulation.options",
    "SimulationResult": "fedloom.results",
    "SiteContext": "fedloom.tasks",
    "SiteData": "fedloom.tasks",
    "SoftmaxRegression": "fedloom.tasks",
    "Strategy": "fedloom.strategies.base",
    "StrategyState": "fedloom.core.state",
    "Task": "fedloom.tasks",
    "TaskError": "fedloom.core.errors",
    "TorchTask": "fedloom.tasks",
    "TrainOutput": "fedloom.core.records",
    "TrainSettings": "fedloom.core.records",
    "Weights": "fedloom.core.weights",
    "WorkspaceError": "fedloom.core.errors",
    "build_strategy": "fedloom.strategies",
    "create_workspace": "fedloom.templates",
    "load_plan": "fedloom.plan",
    "plan_hash": "fedloom.plan",
    "simulate": "fedloom.simulation.run",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'fedloom' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "STRATEGIES",
    "AggregationError",
    "EvalOutput",
    "FedloomError",
    "NumpyTask",
    "Plan",
    "PlanError",
    "QuorumError",
    "RoundRecord",
    "SimulationOptions",
    "SimulationResult",
    "SiteContext",
    "SiteData",
    "SoftmaxRegression",
    "Strategy",
    "StrategyState",
    "Task",
    "TaskError",
    "TorchTask",
    "TrainOutput",
    "TrainSettings",
    "Weights",
    "WorkspaceError",
    "__version__",
    "build_strategy",
    "create_workspace",
    "load_plan",
    "plan_hash",
    "simulate",
]
