"""fedloom: federated learning across organisations. The model travels; the data stays.

The names below are the public Python API; everything else is internal and may change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (fedloom starts fast)
    from fedloom.accumulate import FRACTION_BITS, MeanAccumulator, UpdateBuffer
    from fedloom.aggregator import Aggregator, FederationConfig
    from fedloom.collaborator import Collaborator
    from fedloom.core.clock import FaultPoints, ManualClock, SystemClock
    from fedloom.core.errors import (
        AggregationError,
        FaultInjected,
        FedloomError,
        PlanError,
        QuorumError,
        StateError,
        TaskError,
        TransportError,
        UpdateRejected,
        WorkspaceError,
    )
    from fedloom.core.records import (
        CloseReason,
        EvalOutput,
        Failure,
        FailureKind,
        Instruction,
        InstructionKind,
        MeanSummary,
        RoundRecord,
        SiteAnswer,
        SiteResult,
        SiteUpdate,
        TrainOutput,
        TrainSettings,
        UpdateSet,
    )
    from fedloom.core.weights import TensorSpec, Weights
    from fedloom.plan import Plan, load_plan, plan_hash
    from fedloom.runtime.simulation import SimulationOptions, SimulationResult, simulate
    from fedloom.strategies import STRATEGIES, build_strategy
    from fedloom.strategies.state import StrategyState
    from fedloom.tasks import NumpyTask, SiteContext, SiteData, SoftmaxRegression, Task
    from fedloom.transport import InProcessTransport
    from fedloom.workspace import TEMPLATES, create_workspace

__version__ = "0.1.0"

# where each public name lives: ``import fedloom`` loads none of these modules until a
# name is used, so the command line and the worker processes start in a fraction of the
# time
_PUBLIC = {
    "AggregationError": "fedloom.core.errors",
    "Aggregator": "fedloom.aggregator",
    "CloseReason": "fedloom.core.records",
    "Collaborator": "fedloom.collaborator",
    "EvalOutput": "fedloom.core.records",
    "FRACTION_BITS": "fedloom.accumulate",
    "Failure": "fedloom.core.records",
    "FailureKind": "fedloom.core.records",
    "FaultInjected": "fedloom.core.errors",
    "FaultPoints": "fedloom.core.clock",
    "FederationConfig": "fedloom.aggregator",
    "FedloomError": "fedloom.core.errors",
    "InProcessTransport": "fedloom.transport",
    "Instruction": "fedloom.core.records",
    "InstructionKind": "fedloom.core.records",
    "ManualClock": "fedloom.core.clock",
    "MeanAccumulator": "fedloom.accumulate",
    "MeanSummary": "fedloom.core.records",
    "NumpyTask": "fedloom.tasks",
    "Plan": "fedloom.plan",
    "PlanError": "fedloom.core.errors",
    "QuorumError": "fedloom.core.errors",
    "RoundRecord": "fedloom.core.records",
    "STRATEGIES": "fedloom.strategies",
    "SimulationOptions": "fedloom.runtime.simulation",
    "SimulationResult": "fedloom.runtime.simulation",
    "SiteAnswer": "fedloom.core.records",
    "SiteContext": "fedloom.tasks",
    "SiteData": "fedloom.tasks",
    "SiteResult": "fedloom.core.records",
    "SiteUpdate": "fedloom.core.records",
    "SoftmaxRegression": "fedloom.tasks",
    "StateError": "fedloom.core.errors",
    "StrategyState": "fedloom.strategies.state",
    "SystemClock": "fedloom.core.clock",
    "TEMPLATES": "fedloom.workspace",
    "Task": "fedloom.tasks",
    "TaskError": "fedloom.core.errors",
    "TensorSpec": "fedloom.core.weights",
    "TrainOutput": "fedloom.core.records",
    "TrainSettings": "fedloom.core.records",
    "TransportError": "fedloom.core.errors",
    "UpdateBuffer": "fedloom.accumulate",
    "UpdateRejected": "fedloom.core.errors",
    "UpdateSet": "fedloom.core.records",
    "Weights": "fedloom.core.weights",
    "WorkspaceError": "fedloom.core.errors",
    "build_strategy": "fedloom.strategies",
    "create_workspace": "fedloom.workspace",
    "load_plan": "fedloom.plan",
    "plan_hash": "fedloom.plan",
    "simulate": "fedloom.runtime.simulation",
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
    "FRACTION_BITS",
    "STRATEGIES",
    "TEMPLATES",
    "AggregationError",
    "Aggregator",
    "CloseReason",
    "Collaborator",
    "EvalOutput",
    "Failure",
    "FailureKind",
    "FaultInjected",
    "FaultPoints",
    "FederationConfig",
    "FedloomError",
    "InProcessTransport",
    "Instruction",
    "InstructionKind",
    "ManualClock",
    "MeanAccumulator",
    "MeanSummary",
    "NumpyTask",
    "Plan",
    "PlanError",
    "QuorumError",
    "RoundRecord",
    "SimulationOptions",
    "SimulationResult",
    "SiteAnswer",
    "SiteContext",
    "SiteData",
    "SiteResult",
    "SiteUpdate",
    "SoftmaxRegression",
    "StateError",
    "StrategyState",
    "SystemClock",
    "Task",
    "TaskError",
    "TensorSpec",
    "TrainOutput",
    "TrainSettings",
    "TransportError",
    "UpdateBuffer",
    "UpdateRejected",
    "UpdateSet",
    "Weights",
    "WorkspaceError",
    "__version__",
    "build_strategy",
    "create_workspace",
    "load_plan",
    "plan_hash",
    "simulate",
]
