"""A regression end to end: the built-in diabetes dataset, the regression template (R²
and MAE from TorchTask), and cross-entropy on float targets refused before round 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from workspaces import make_workspace, run_cli

from fedloom import load_plan
from fedloom.core.errors import PlanError
from fedloom.data.datasets import REGRESSION_DATASETS, load_dataset
from fedloom.runtime.sitedata import data_problems
from fedloom.simulation.attack_setup import make_attack
from fedloom.simulation.options import SimulationOptions
from fedloom.simulation.run import simulate
from fedloom.tasks.base import SiteData

CROSS_ENTROPY_TASK = """
from torch import nn
from fedloom.tasks import TorchTask

task = TorchTask(lambda: nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 1)))
"""


def test_diabetes_is_a_regression_with_standardised_float_targets() -> None:
    data = load_dataset("diabetes", seed=0)
    assert "diabetes" in REGRESSION_DATASETS and data.regression and data.num_classes is None
    assert (len(data.y_train), len(data.y_test), data.num_features) == (354, 88, 10)
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.float32 and y.shape == (len(x),)
    assert abs(float(data.y_train.mean())) < 1e-6 and float(data.y_train.std()) == pytest.approx(1)
    assert np.allclose(data.x_train.mean(axis=0), 0, atol=1e-5)
    split = data_problems(SiteData(data.x_train, data.y_train, data.x_test, data.y_test), None)
    assert split == []  # float targets are fine when there are no classes


def test_label_partitions_and_label_flips_are_refused_for_a_regression(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "regression")
    for partition in ("dirichlet:0.5", "shards:2"):
        with pytest.raises(PlanError, match="regression dataset") as err:
            load_plan(ws, [f"data.partition={partition}"])
        assert "iid or quantity" in str(err.value)
    load_plan(ws, ["data.partition=quantity:1.0"])
    plan = load_plan(ws)
    with pytest.raises(PlanError, match="label-flip: flips class labels") as err:
        make_attack(plan, SimulationOptions(attack="label-flip", attackers=1))
    assert "sign-flip" in str(err.value)


def test_the_regression_template_reports_r2_and_mae(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "regression")
    plan = load_plan(ws, ["rounds=2"])
    result = simulate(ws, plan, SimulationOptions(workers=0))
    metrics = result.test_metrics
    assert set(metrics) == {"r2", "mae", "loss"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["r2"] > 0  # better than predicting the mean, even after two rounds


@pytest.mark.process
def test_simulate_refuses_cross_entropy_on_float_targets_before_round_1(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "regression")
    (ws / "task.py").write_text(CROSS_ENTROPY_TASK)
    proc = run_cli("simulate", str(ws), "--workers", "1", "--quiet", "--run-name", "ce")
    assert proc.returncode == 4, proc.stderr
    assert "site-01's data does not fit the task" in proc.stderr
    assert "not class labels" in proc.stderr and "mse_loss" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (ws / "runs" / "ce" / "metrics.jsonl").read_text() == ""  # no round ran
    summary = json.loads((ws / "runs" / "ce" / "summary.json").read_text())
    assert summary["status"] != "completed"
