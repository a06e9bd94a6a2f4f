"""fedloom: federated learning across organisations. The model travels; the data stays.

The names below are the public Python API; everything else is internal and may change.
"""

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
from fedloom.orchestration import Aggregator, CloseReason, FederationConfig, RoundRecord
from fedloom.plan import Plan, load_plan, plan_hash
from fedloom.records import (
    EvalOutput,
    Failure,
    FailureKind,
    Instruction,
    InstructionKind,
    MeanSummary,
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
