"""Experiment tracking: a deployed run (a real aggregator process and its collaborators
over gRPC) leaves an MLflow store that MLflow's own client reads back, with every
round's metrics, the plan and its hash, and the final model, and TensorBoard event
files that TensorBoard's reader reads back; a tracker that fails mid-run is switched
off and the run goes on; a store that cannot be used stops the run before round 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspaces import make_workspace, run_cli

from fedloom.core.errors import PlanError
from fedloom.tracking import TrackerSet, TrackSpec, parse_track


def test_track_values_are_checked() -> None:
    assert parse_track(["mlflow", "tensorboard=/tmp/tb"]) == (
        TrackSpec("mlflow"),
        TrackSpec("tensorboard", "/tmp/tb"),
    )
    with pytest.raises(PlanError) as err:
        parse_track(["wandb", "mlflow=", "tensorboard", "tensorboard"])
    problems = err.value.problems
    assert "unknown tracker 'wandb'" in problems[0]
    assert "mlflow= needs a value" in problems[1]
    assert "tensorboard is given twice" in problems[2]


class Flaky:
    """A tracking backend whose server goes away after its first round."""

    name = "flaky"

    def __init__(self) -> None:
        self.rounds: list[object] = []

    def round_closed(self, record: object) -> None:
        if self.rounds:
            raise ConnectionError("the tracking server went away")
        self.rounds.append(record)

    def finished(self, summary: object, run_dir: Path) -> None:
        raise AssertionError("a dropped tracker is not called again")

    def failed(self, status: str, run_dir: Path) -> None:
        raise AssertionError("a dropped tracker is not called again")


def test_a_tracker_that_fails_is_dropped_and_named(tmp_path: Path) -> None:
    flaky, steady = Flaky(), Flaky()
    trackers = TrackerSet([flaky])
    trackers.round_closed("round 1")  # type: ignore[arg-type]
    trackers.round_closed("round 2")  # type: ignore[arg-type]
    trackers.finished({}, tmp_path)
    assert flaky.rounds == ["round 1"] and trackers.trackers == []
    assert trackers.dropped == ["flaky: ConnectionError: the tracking server went away"]
    assert steady.rounds == []


def read_mlflow(uri: str, experiment: str) -> tuple[object, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    (run,) = client.search_runs([found.experiment_id])
    return client, run


@pytest.mark.process
def test_a_deployed_run_is_tracked_by_its_aggregator_in_mlflow_and_tensorboard(
    tmp_path: Path,
) -> None:
    """A real aggregator process and 3 collaborators over gRPC; only the aggregator is
    handed --track (the sites' command lines never name it)."""
    ws = make_workspace(tmp_path, "breast-cancer", "ws")
    done = run_cli(
        "simulate", str(ws), "--transport", "grpc", "--sites", "3", "--rounds", "3",
        "--run-name", "tracked", "--track", "mlflow", "--track", "tensorboard", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = ws / "runs" / "tracked"
    summary = json.loads((run_dir / "summary.json").read_text())

    client, run = read_mlflow(f"sqlite:///{ws / 'runs' / 'mlflow.db'}", "breast-cancer")
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["plan_hash"] == summary["plan_hash"]
    assert run.data.params["rounds"] == "3" and run.data.params["strategy.name"] == "fedavg"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    for site in ("site-01", "site-02", "site-03"):
        history = client.get_metric_history(run.info.run_id, f"{site}/train/train_loss")
        assert [(m.step, m.value) for m in history] == [
            (r["round"], r["train_loss"]) for r in train if r["site"] == site
        ]
    steps = client.get_metric_history(run.info.run_id, "train/train_loss")
    assert [m.step for m in steps] == [1, 2, 3]
    assert run.data.metrics["final/test_accuracy"] == summary["test_accuracy"]
    got = Path(client.download_artifacts(run.info.run_id, "model/final.safetensors", tmp_path))
    assert got.read_bytes() == (run_dir / "final.safetensors").read_bytes()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("site-02/train/train_loss")
    assert [(e.step, e.value) for e in scalars] == [
        (r["round"], pytest.approx(r["train_loss"], rel=1e-6))
        for r in train
        if r["site"] == "site-02"
    ]
    assert "plan_hash/text_summary" in events.Tags()["tensors"]


@pytest.mark.process
def test_a_store_that_cannot_be_used_stops_the_run_before_round_one(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer", "ws")
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("these are notes, not an SQLite database\n" * 100)
    done = run_cli(
        "simulate", str(ws), "--rounds", "2", "--workers", "0", "--run-name", "bad",
        "--track", f"mlflow=sqlite:///{not_a_database}",
    )  # fmt: skip
    assert done.returncode == 6, done.stdout + done.stderr
    assert "--track mlflow: the tracking store sqlite:///" in done.stderr
    assert not (ws / "runs" / "bad" / "metrics.jsonl").read_text()
    bad = run_cli("simulate", str(ws), "--track", "wandb")
    assert bad.returncode == 2 and "unknown tracker 'wandb'" in bad.stderr
