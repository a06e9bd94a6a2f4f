"""End-to-end simulations of real templates: accuracy, determinism, run artefacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from workspaces import make_workspace, run_cli, write_training_twist

from fedloom import (
    QuorumError,
    SimulationOptions,
    load_plan,
    simulate,
)
from fedloom.core.records import CloseReason, FailureKind, InstructionKind
from fedloom.core.weights import weights_equal
from fedloom.store import load_weights

pytestmark = [pytest.mark.slow, pytest.mark.process]


def test_numpy_breast_cancer_federation_learns_without_torch(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    result = simulate(ws, load_plan(ws, ["rounds=10"]), SimulationOptions(workers=0))
    assert result.test_metrics["accuracy"] >= 0.9
    train = [r for r in result.history if r.kind is InstructionKind.TRAIN]
    assert len(train) == 10
    assert all(r.close_reason is CloseReason.ALL_ANSWERED for r in train)
    assert result.history[-1].kind is InstructionKind.EVALUATE
    assert {r.site for r in result.history[-1].results} == set(result.plan.roster)


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(SimulationOptions(workers=2), id="workers-2"),
        pytest.param(SimulationOptions(workers=1, roundtrip=True), id="workers-1-roundtrip"),
    ],
)
def test_digits_torch_runs_are_bit_identical_across_workers_and_roundtrip(
    tmp_path: Path, variant: SimulationOptions
) -> None:
    ws = make_workspace(tmp_path, "digits")
    plan = load_plan(ws, ["rounds=3"])
    reference = simulate(ws, plan, SimulationOptions(workers=1))
    other = simulate(ws, plan, variant)
    assert weights_equal(reference.final_weights, other.final_weights)
    assert reference.test_metrics == other.test_metrics
    if variant.roundtrip:
        # the wire format is bigger than the raw tensors, never smaller
        assert other.bytes_sent >= reference.bytes_sent > 0
    changed = simulate(ws, load_plan(ws, ["rounds=3", "seed=1"]), SimulationOptions(workers=0))
    assert not weights_equal(reference.final_weights, changed.final_weights)


def test_demo_federation_beats_093_and_writes_every_artefact(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "digits")
    proc = run_cli(
        "simulate", str(ws), "--sites", "8", "--partition", "dirichlet:0.3",
        "--strategy", "fedavg", "--baseline", "--run-name", "demo", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = ws / "runs" / "demo"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.93
    assert summary["centralized_accuracy"] is not None
    assert summary["sites"] == 8 and summary["rounds"] == 30 and summary["strategy"] == "fedavg"
    assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0
    assert summary["worst_site_accuracy"] <= summary["mean_site_accuracy"]
    assert summary["plan_hash"] in proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 31  # one line per site per round, final evaluation included
    assert {r["site"] for r in rows} == {f"site-0{i}" for i in range(1, 9)}
    final = load_weights(run / "final.safetensors")
    assert list(final) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert final["0.weight"].dtype == np.float32
    png = (run / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "Final global model at each site" in proc.stdout


def test_a_site_whose_task_fails_is_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(
        ws, "if context.site == 'site-02': raise RuntimeError('disk full at site-02')"
    )
    plan = load_plan(ws, ["rounds=3", "deadline.min_fraction=0.5"])
    result = simulate(ws, plan, SimulationOptions(workers=1))
    for record in result.history[:3]:
        assert record.close_reason is CloseReason.QUORUM
        [failure] = record.failures
        assert failure.site == "site-02" and failure.kind is FailureKind.ERROR
        assert "disk full at site-02" in failure.reason
        assert len(record.results) == 4
    assert result.test_metrics["accuracy"] > 0.85


def test_an_upload_the_aggregator_breaks_fails_the_site_at_once_not_at_the_deadline(
    tmp_path: Path,
) -> None:
    """In a simulation no stream breaks on its way: an upload that broke off met the
    aggregator's own error. The site fails the round then and there (every site settled,
    quorum met), instead of the round waiting for its deadline (600 s) for a resend."""
    from fedloom.core.clock import FaultPoints
    from fedloom.core.errors import FaultInjected

    ws = make_workspace(tmp_path, "breast-cancer")
    plan = load_plan(ws, ["rounds=2", "deadline.min_fraction=0.5"])
    faults, broken = FaultPoints(), []

    def breaks(name: str, context: dict) -> None:
        if context["site"] == "site-03" and context["round"] == 1:
            broken.append(context["site"])
            raise FaultInjected("the aggregator failed while it read the upload")

    faults.arm("upload.receiving", breaks)
    seen: list = []
    result = simulate(ws, plan, SimulationOptions(workers=0), faults=faults, on_failure=seen.append)
    first = result.history[0]
    assert broken == ["site-03"] and first.close_reason is CloseReason.QUORUM
    [failure] = first.failures
    assert failure.site == "site-03" and failure.kind is FailureKind.ERROR
    assert "upload broke off" in failure.reason and "failed while it read" in failure.reason
    assert [(f.site, f.round) for f in seen] == [("site-03", 1)]
    assert result.history[1].close_reason is CloseReason.ALL_ANSWERED


def test_a_hung_site_fails_at_the_deadline_and_the_run_completes(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, "if context.site == 'site-03': threading.Event().wait()")
    plan = load_plan(ws, ["rounds=2", "deadline.round_seconds=8", "deadline.min_fraction=0.5"])
    result = simulate(ws, plan, SimulationOptions(workers=2))
    train = [r for r in result.history if r.kind is InstructionKind.TRAIN]
    assert [r.close_reason for r in train] == [CloseReason.QUORUM] * 2
    for record in train:
        [failure] = record.failures
        assert failure.site == "site-03" and failure.kind is FailureKind.ERROR
        assert "gave no answer within 8 s" in failure.reason
        assert len(record.results) == 4
    final = result.history[-1]
    assert final.kind is InstructionKind.EVALUATE
    assert {r.site for r in final.results} >= {"site-01", "site-02", "site-04", "site-05"}


def test_a_site_that_kills_its_worker_fails_alone_in_its_batch(tmp_path: Path) -> None:
    # 40 sites on one worker go in batches of 10: the batch holding site-07 loses its
    # worker process; it is run again site by site, so only site-07 fails
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, "if context.site == 'site-07': import os; os._exit(3)")
    plan = load_plan(ws, ["rounds=1", "sites=40", "deadline.min_fraction=0.5"])
    result = simulate(ws, plan, SimulationOptions(workers=1))
    [train] = [r for r in result.history if r.kind is InstructionKind.TRAIN]
    assert train.close_reason is CloseReason.QUORUM
    [failure] = train.failures
    assert failure.site == "site-07" and failure.kind is FailureKind.ERROR
    assert "worker process died (exit code 3)" in failure.reason
    assert len(train.results) == 39


def test_a_failed_run_keeps_its_metrics_and_says_why(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, "if context.round == 3: raise RuntimeError('the GPU caught fire')")
    proc = run_cli(
        "simulate", str(ws), "--workers", "0", "--quiet", "--run-name", "broken",
        "rounds=5", "deadline.retries=1",
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    assert "the GPU caught fire" in proc.stderr
    run = ws / "runs" / "broken"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "the GPU caught fire" in summary["error"]
    assert summary["rounds_finished"] == 2  # rounds 1 and 2: the failed attempts at 3 finish none
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["attempt"]) for r in rows} == {(1, 1), (2, 1), (3, 1), (3, 2)}
    third = [r for r in rows if r["round"] == 3]
    assert {r["status"] for r in third} <= {"error", "cancelled"}
    assert any(r["status"] == "error" for r in third)


def test_a_task_returning_the_wrong_type_is_told_what_to_return(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(ws, "pass", result="dict(trained.weights)")
    plan = load_plan(ws, ["rounds=1", "deadline.retries=0", "deadline.min_fraction=0.2"])
    with pytest.raises(QuorumError, match=r"train must return TrainOutput\(weights"):
        simulate(ws, plan, SimulationOptions(workers=0))
