"""fedloom: federated learning across organisations. The model travels; the data stays.

The names below are the public Python API; everything else is internal and may change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (fedloom starts fast)
    from fedloom.accumulate import FRACTION_BITS, MeanAccumulator, UpdateBuffer
    from fedloom.clock import FaultPoints, ManualClock, SystemClock
    from fedloom.collaborator import Collaborator
    from fedloom.errors import (
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
    from fedloom.orchestration import Aggregator, FederationConfig
    from fedloom.plan import Plan, load_plan, plan_hash
    from fedloom.records import (
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
    from fedloom.runtime.simulation import SimulationOptions, SimulationResult, simulate
    from fedloom.strategies import STRATEGIES, build_strategy
    from fedloom.strategies.state import StrategyState
    from fedloom.tasks import NumpyTask, SiteContext, SiteData, SoftmaxRegression, Task
    from fedloom.transport import InProcessTransport
    from fedloom.weights import TensorSpec, Weights
    from fedloom.workspace import TEMPLATES, create_workspace

__version__ = "0.1.0"

# where each public name lives: ``import fedloom`` loads none of these modules until a
# name is used, so the command line and the worker processes start in a fraction of the
# time
_PUBLIC = {
    "AggregationError": "fedloom.errors",
    "Aggregator": "fedloom.orchestration",
    "CloseReason": "fedloom.records",
    "Collaborator": "fedloom.collaborator",
    "EvalOutput": "fedloom.records",
    "FRACTION_BITS": "fedloom.accumulate",
    "Failure": "fedloom.records",
    "FailureKind": "fedloom.records",
    "FaultInjected": "fedloom.errors",
    "FaultPoints": "fedloom.clock",
    "FederationConfig": "fedloom.orchestration",
    "FedloomError": "fedloom.errors",
    "InProcessTransport": "fedloom.transport",
    "Instruction": "fedloom.records",
    "InstructionKind": "fedloom.records",
    "ManualClock": "fedloom.clock",
    "MeanAccumulator": "fedloom.accumulate",
    "MeanSummary": "fedloom.records",
    "NumpyTask": "fedloom.tasks",
    "Plan": "fedloom.plan",
    "PlanError": "fedloom.errors",
    "QuorumError": "fedloom.errors",
    "RoundRecord": "fedloom.records",
    "STRATEGIES": "fedloom.strategies",
    "SimulationOptions": "fedloom.runtime.simulation",
    "SimulationResult": "fedloom.runtime.simulation",
    "SiteAnswer": "fedloom.records",
    "SiteContext": "fedloom.tasks",
    "SiteData": "fedloom.tasks",
    "SiteResult": "fedloom.records",
    "SiteUpdate": "fedloom.records",
    "SoftmaxRegression": "fedloom.tasks",
    "StateError": "fedloom.errors",
    "StrategyState": "fedloom.strategies.state",
    "SystemClock": "fedloom.clock",
    "TEMPLATES": "fedloom.workspace",
    "Task": "fedloom.tasks",
    "TaskError": "fedloom.errors",
    "TensorSpec": "fedloom.weights",
    "TrainOutput": "fedloom.records",
    "TrainSettings": "fedloom.records",
    "TransportError": "fedloom.errors",
    "UpdateBuffer": "fedloom.accumulate",
    "UpdateRejected": "fedloom.errors",
    "UpdateSet": "fedloom.records",
    "Weights": "fedloom.weights",
    "WorkspaceError": "fedloom.errors",
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
