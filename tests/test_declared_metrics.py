"""A run's results follow the task's declared metrics (``Metrics``): a regression's
summary, tables and plot say R² and MAE, not accuracy; a lower-is-better primary's
worst site is its highest. Real workspaces, real worker processes, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspaces import make_workspace, run_cli

from fedloom import SimulationOptions, load_plan
from fedloom.figures import (
    metric_names,
    metrics_from_json,
    metrics_to_json,
    plot_file,
    worst_first,
    worst_value,
)
from fedloom.report import final_site_metrics, summary
from fedloom.simulation.run import simulate
from fedloom.tasks import Metrics

pytestmark = pytest.mark.process

# A linear regression in NumPy on generated data: three sites whose features are shifted
# and whose targets are noisier from one site to the next.
REGRESSION_TASK = """
import numpy as np
from fedloom.tasks import Metrics, NumpyTask, SiteData

TRUE_W = np.array([1.5, -2.0, 0.5, 1.0])


def init(seed):
    return {"w": np.zeros(4, np.float32), "b": np.zeros(1, np.float32)}


def train(weights, data, settings, rng):
    w, b = weights["w"].astype(np.float64), weights["b"].astype(np.float64)
    x, y = data.x_train, data.y_train
    for _ in range(settings.epochs):
        for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // settings.batch_size)):
            err = x[idx] @ w + b - y[idx]
            w = w - settings.lr * 2 * (x[idx].T @ err) / len(idx)
            b = b - settings.lr * 2 * err.mean()
    return {"w": w.astype(np.float32), "b": b.astype(np.float32)}


def evaluate(weights, x, y):
    err = x @ weights["w"] + weights["b"] - y
    spread = ((y - y.mean()) ** 2).sum()
    return {"r2": 1 - (err**2).sum() / spread, "mae": np.abs(err).mean(), "loss": (err**2).mean()}


def rows(seed, n, noise, shift):
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1.0, (n, 4)).astype(np.float32)
    return x, (x @ TRUE_W + 0.3 + rng.normal(0, noise, n)).astype(np.float32)


class Regression(NumpyTask):
    metrics = Metrics(primary=PRIMARY, lower_is_better=("loss", "mae"))

    def load_data(self, context):
        x, y = rows(context.seed, 80, 0.5 + context.index, 0.3 * context.index)
        return SiteData(x[:60], y[:60], x[60:], y[60:])

    def load_test_data(self, context):
        return rows(context.seed, 100, 0.5, 0.0)


task = Regression(init, train, evaluate)
"""

PLAN = """
version: 1
name: regression
task: task.py
seed: 0
rounds: 3
sites: 3
data:
  dataset: custom
strategy:
  name: fedavg
training:
  epochs: 1
  batch_size: 16
  lr: 0.05
"""


def regression_workspace(root: Path, primary: str = "r2") -> Path:
    ws = make_workspace(root, "breast-cancer", f"regression-{primary}")
    (ws / "task.py").write_text(REGRESSION_TASK.replace("PRIMARY", repr(primary)))
    (ws / "federation.yaml").write_text(PLAN)
    return ws


def test_a_regression_run_reports_r2_and_mae_everywhere(tmp_path: Path) -> None:
    """``fedloom simulate --baseline`` of a task whose primary metric is R²: the progress
    line, the sites' table, the summary table, summary.json and the plot say R² and
    MAE, never accuracy."""
    ws = regression_workspace(tmp_path)
    done = run_cli("simulate", str(ws), "--workers", "1", "--baseline", "--run-name", "r")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "val r2 (global model) " in out, out
    assert "accuracy" not in out, out
    sites_table = out[out.index("Final global model at each site") : out.index("Summary")]
    header = next(line for line in sites_table.splitlines() if "val samples" in line)
    assert header.split("┃")[3:6] == [" r2     ", " loss   ", " mae    "], header
    for key in ("test_r2", "test_mae", "centralized_r2", "mean_site_r2", "worst_site_r2"):
        assert f"│ {key} " in out, out

    run = ws / "runs" / "r"
    s = json.loads((run / "summary.json").read_text())
    assert (s["primary_metric"], s["primary_better"]) == ("r2", "higher")
    assert [k for k in s if k.startswith(("test_", "centralized_"))] == [
        "test_r2",
        "test_loss",
        "test_mae",
        "centralized_r2",
        "centralized_loss",
        "centralized_mae",
    ]
    assert 0.5 < s["test_r2"] <= 1 and 0 < s["test_mae"] and 0 < s["test_loss"]
    assert 0.5 < s["centralized_r2"] <= 1
    assert not any("accuracy" in k for k in s)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r["global_r2"] for r in rows if r["kind"] == "evaluate"]
    assert len(final) == 3
    assert s["worst_site_r2"] == pytest.approx(min(final))  # higher is better: the lowest
    assert s["mean_site_r2"] == pytest.approx(sum(final) / 3)
    png = (run / "r2.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert not (run / "accuracy.png").exists()


def test_the_deployed_aggregator_reports_the_declared_metrics_too(tmp_path: Path) -> None:
    """Over gRPC, real processes: the aggregator loads the task itself and its progress
    line, tables, summary and plot say R² (a custom dataset has no test set there)."""
    ws = regression_workspace(tmp_path)
    done = run_cli("simulate", str(ws), "--transport", "grpc", "--run-name", "g", timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "val r2 (global model) " in out and "│ worst_site_r2 " in out, out
    assert "accuracy" not in out, out
    s = json.loads((ws / "runs" / "g" / "summary.json").read_text())
    assert (s["primary_metric"], s["primary_better"]) == ("r2", "higher")
    assert s["test_r2"] is None and 0 < s["worst_site_r2"] < s["mean_site_r2"] < 1
    assert (ws / "runs" / "g" / "r2.png").read_bytes().startswith(b"\x89PNG")


def test_a_lower_is_better_primary_names_the_highest_site_the_worst(tmp_path: Path) -> None:
    """The same regression judged by MAE: the worst site is the one with the highest
    MAE, the summary says lower is better, and the plot is mae.png."""
    ws = regression_workspace(tmp_path, "mae")
    result = simulate(ws, load_plan(ws), SimulationOptions(workers=1))
    assert result.metrics == Metrics(primary="mae", lower_is_better=("loss", "mae"))
    s = summary(result, "m")
    sites = final_site_metrics(result.history)
    maes = {site: m["global_mae"] for site, m in sites.items()}
    assert len(set(maes.values())) == 3  # the noisier sites are further off
    assert (s["primary_metric"], s["primary_better"]) == ("mae", "lower")
    assert s["worst_site_mae"] == max(maes.values())
    assert worst_first(result.metrics, sites, "global_mae")[0] == max(maes, key=maes.__getitem__)
    assert [k for k in s if k.startswith("test_")] == ["test_mae", "test_loss", "test_r2"]
    assert plot_file(result.metrics) == "mae.png"


def test_metric_names_put_the_primary_first_then_the_declared_then_the_rest() -> None:
    declared = Metrics(primary="dice", lower_is_better=("loss", "*distance", "hd95"))
    found = ["iou", "loss", "dice", "hd95", "area"]
    assert metric_names(declared, found) == ["dice", "loss", "hd95", "area", "iou"]
    assert metric_names(Metrics(), []) == ["accuracy", "loss"]  # a classifier's, as always
    assert metric_names(Metrics(primary="loss"), ["loss"]) == ["loss"]


def test_the_worst_value_respects_the_direction_and_skips_what_is_not_finite() -> None:
    declared = Metrics(primary="mae", lower_is_better=("mae", "*loss"))
    assert worst_value(declared, "mae", [0.3, 0.9, float("nan"), 0.1]) == 0.9
    assert worst_value(declared, "val_loss", [0.3, 0.9]) == 0.9  # a pattern names it
    assert worst_value(declared, "r2", [0.3, 0.9, float("inf")]) == 0.3
    assert worst_value(declared, "mae", []) is None
    sites = {"a": {"global_mae": 0.2}, "b": {"global_mae": 0.5}, "c": {}, "d": {"global_mae": 0.1}}
    assert worst_first(declared, sites, "global_mae") == ["c", "b", "a", "d"]
    higher = Metrics(primary="dice")
    dice = {"a": {"global_dice": 0.2}, "b": {"global_dice": 0.5}}
    assert worst_first(higher, dice, "global_dice") == ["a", "b"]


def test_the_declaration_goes_through_json_and_names_a_safe_plot_file() -> None:
    declared = Metrics(primary="r2", lower_is_better=("loss", "mae"))
    assert metrics_from_json(json.loads(json.dumps(metrics_to_json(declared)))) == declared
    assert metrics_from_json(None) == Metrics()  # an older worker says nothing: a classifier
    assert metrics_from_json({"primary": 3, "lower_is_better": []}) == Metrics()
    assert plot_file(Metrics()) == "accuracy.png"
    assert plot_file(Metrics(primary="../dice score")) == ".._dice_score.png"
