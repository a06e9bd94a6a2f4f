"""Test helpers: real workspaces made from fedloom's own templates."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from fedloom import create_workspace

REPO = Path(__file__).resolve().parents[1]
FEDLOOM = [sys.executable, "-m", "fedloom.cli"]


def make_workspace(root: Path, template: str, name: str | None = None) -> Path:
    """Copy the template ``template`` into ``root/name`` and return the folder."""
    return create_workspace(root / (name or template), template)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: Mapping[str, str] = {}
) -> subprocess.CompletedProcess[str]:
    """Run ``fedloom ARGS`` as a real OS process (with ``env`` added to this one's)."""
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", **env}
    return subprocess.run(
        [*FEDLOOM, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# What a command that only reads or prints must not import: the numerics, the wire, the
# PKI, the plots and the round loop (each command that needs one imports it itself).
HEAVY_MODULES = (
    "torch",
    "grpc",
    "matplotlib",
    "numpy",
    "cryptography",
    "google.protobuf",
    "safetensors",
    "fedloom.plan",
    "fedloom.aggregator",
)


def imported_modules(*args: str) -> set[str]:
    """The modules ``python -X importtime -m fedloom ARGS`` imports, by name."""
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedloom", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert lines, proc.stderr
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # [0]: the header


def heavy_imports(modules: set[str], heavy: tuple[str, ...] = HEAVY_MODULES) -> list[str]:
    """Which of ``heavy`` (packages: their submodules too) are among ``modules``."""
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in heavy))


def write_training_twist(ws: Path, twist: str, *, result: str = "trained") -> None:
    """Make ``ws`` (a breast-cancer workspace) train through a task that first runs
    ``twist`` (one Python statement, with ``context`` and ``weights`` in scope) and then
    returns ``result`` (an expression over ``trained``, the normal training output)."""
    (ws / "task.py").write_text(
        "import threading\n"
        "from fedloom.tasks import SoftmaxRegression\n"
        "class Twisted(SoftmaxRegression):\n"
        "    def train(self, weights, data, settings, context):\n"
        f"        {twist}\n"
        "        trained = super().train(weights, data, settings, context)\n"
        f"        return {result}\n"
        "task = Twisted(num_features=30, num_classes=2)\n"
    )


# A model of 8 MB (two 4 MiB chunks each way), so a process can be killed between the
# chunks of a download or an upload; the pad moves each round, so it is aggregated too.
PADDED_TASK = """
import numpy as np
from fedloom import TrainOutput
from fedloom.tasks import SoftmaxRegression

PAD = 2_000_000


class Padded(SoftmaxRegression):
    def init_weights(self, seed):
        return {**super().init_weights(seed), "pad": np.zeros(PAD, np.float32)}

    def train(self, weights, data, settings, context):
        core = {k: v for k, v in weights.items() if k != "pad"}
        out = super().train(core, data, settings, context)
        pad = weights["pad"] + np.float32(context.round) / 1024
        return TrainOutput({**out.weights, "pad": pad}, out.num_samples, out.metrics)

    def evaluate(self, weights, data, context):
        return super().evaluate({k: v for k, v in weights.items() if k != "pad"}, data, context)


task = Padded(num_features=30, num_classes=2)
"""
