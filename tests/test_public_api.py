"""The curated public API: exactly these names, and no heavy imports."""

import subprocess
import sys

import pytest

import fedloom

pytestmark = pytest.mark.process

EXPECTED = {
    "FRACTION_BITS", "STRATEGIES", "TEMPLATES", "create_workspace", "AggregationError",
    "Aggregator", "CloseReason",
    "Collaborator", "EvalOutput", "Failure", "FailureKind", "FaultInjected", "FaultPoints",
    "FederationConfig", "FedloomError", "InProcessTransport", "Instruction",
    "InstructionKind", "ManualClock", "MeanAccumulator", "MeanSummary", "NumpyTask", "Plan",
    "PlanError", "QuorumError", "RoundRecord", "SimulationOptions", "SimulationResult",
    "SiteAnswer", "SiteContext", "SiteData", "SiteResult", "SiteUpdate", "SoftmaxRegression",
    "StateError", "StrategyState", "SystemClock", "Task", "TaskError", "TensorSpec",
    "TrainOutput", "TrainSettings", "TransportError", "UpdateBuffer", "UpdateRejected",
    "UpdateSet", "Weights", "WorkspaceError", "__version__", "build_strategy", "load_plan",
    "plan_hash", "simulate",
}  # fmt: skip


def test_public_names_are_exactly_the_curated_ones() -> None:
    assert set(fedloom.__all__) == EXPECTED
    assert fedloom.__all__ == sorted(fedloom.__all__, key=lambda n: (not n.isupper(), n))
    for name in fedloom.__all__:
        assert hasattr(fedloom, name), name


def test_importing_fedloom_pulls_in_no_torch_grpc_or_cli_libraries() -> None:
    code = (
        "import sys, fedloom\n"
        "heavy = {'torch', 'grpc', 'typer', 'rich', 'matplotlib', 'sklearn'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
