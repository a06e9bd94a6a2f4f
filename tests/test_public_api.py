"""The curated public API: exactly these names, and no heavy imports."""

import subprocess
import sys

import pytest

import fedloom

pytestmark = pytest.mark.process

EXPECTED = {
    "STRATEGIES", "AggregationError", "EvalOutput", "FedloomError", "NumpyTask", "Plan",
    "PlanError", "QuorumError", "RoundRecord", "SimulationOptions", "SimulationResult",
    "SiteContext", "SiteData", "SoftmaxRegression", "Strategy", "StrategyState", "Task",
    "TaskError", "TorchTask", "TrainOutput", "TrainSettings", "Weights", "WorkspaceError",
    "__version__", "build_strategy", "create_workspace", "load_plan", "plan_hash", "simulate",
}  # fmt: skip


def test_public_names_are_exactly_the_curated_ones() -> None:
    assert set(fedloom.__all__) == EXPECTED
    assert fedloom.__all__ == sorted(fedloom.__all__, key=lambda n: (not n.isupper(), n))
    assert len(fedloom.__all__) <= 30
    for name in fedloom.__all__:
        assert hasattr(fedloom, name), name


def test_internals_are_not_re_exported() -> None:
    for name in (
        "MeanAccumulator",
        "FaultPoints",
        "ManualClock",
        "Aggregator",
        "InProcessTransport",
    ):
        assert not hasattr(fedloom, name), name


def test_importing_fedloom_pulls_in_no_torch_grpc_or_cli_libraries() -> None:
    code = (
        "import sys, fedloom\n"
        "heavy = {'torch', 'grpc', 'typer', 'rich', 'matplotlib', 'sklearn'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
