"""``fedloom evaluate``: a given model evaluated at every site with no training, in
simulation and over gRPC with real collaborators; the figures are the model's own (the
same as the run that trained it found), whatever way the model is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from workspaces import make_workspace, run_cli

from fedloom import load_plan, simulate
from fedloom.core.errors import TaskError
from fedloom.core.records import InstructionKind
from fedloom.core.state import FederationState, StrategyState
from fedloom.simulation.options import SimulationOptions
from fedloom.store import save_weights
from fedloom.store.checkpoint import save_federation_state
from fedloom.store.model_file import load_model


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path, object]:
    """A breast-cancer workspace of 3 sites, and a model it trained for 3 rounds."""
    ws = make_workspace(tmp_path, "breast-cancer", "ws")
    plan = load_plan(ws, ["rounds=3", "sites=3"])
    result = simulate(ws, plan, SimulationOptions(workers=0))
    model = tmp_path / "model.safetensors"
    save_weights(model, result.final_weights)
    return ws, model, result


def test_a_given_model_is_evaluated_as_the_run_that_trained_it_found_it(
    trained: tuple[Path, Path, object], tmp_path: Path
) -> None:
    ws, model, result = trained
    plan = load_plan(ws, ["rounds=3", "sites=3"])
    evaluated = simulate(ws, plan, SimulationOptions(workers=0, model=load_model(model)))
    assert [r.kind for r in evaluated.history] == [InstructionKind.EVALUATE]  # no training
    assert evaluated.test_metrics == result.test_metrics  # type: ignore[attr-defined]
    final = result.history[-1]  # type: ignore[attr-defined]
    assert {r.site: r.metrics for r in evaluated.history[-1].results} == {
        r.site: r.metrics for r in final.results
    }
    for name, array in result.final_weights.items():  # type: ignore[attr-defined]
        assert np.array_equal(evaluated.final_weights[name], array)

    # an aggregator's checkpoint names the same model (its strategy state's weights)
    checkpoint = tmp_path / "round-0003.safetensors"
    state = StrategyState(weights=load_model(model), scalars={"step": 3})
    save_federation_state(checkpoint, FederationState(state))
    again = simulate(ws, plan, SimulationOptions(workers=0, model=load_model(checkpoint)))
    assert again.test_metrics == evaluated.test_metrics


def test_a_model_of_another_task_is_refused_with_the_tensor_named(
    trained: tuple[Path, Path, object], tmp_path: Path
) -> None:
    ws, model, _ = trained
    weights = dict(load_model(model))
    name = next(iter(weights))
    weights[name] = np.zeros((3, 3), np.float32)
    wrong = tmp_path / "wrong.safetensors"
    save_weights(wrong, weights)
    plan = load_plan(ws, ["rounds=3", "sites=3"])
    with pytest.raises(TaskError, match=rf"tensor '{name}' is float32\[3, 3\], the task's"):
        simulate(ws, plan, SimulationOptions(workers=0, model=load_model(wrong)))


@pytest.mark.process
def test_over_grpc_each_real_site_reports_and_the_mean_is_sample_weighted(
    trained: tuple[Path, Path, object],
) -> None:
    ws, model, result = trained
    done = run_cli(
        "evaluate", str(ws), "--model", str(model), "--transport", "grpc",
        "--run-name", "grpc", "--quiet", "rounds=3", "sites=3",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads((ws / "runs" / "grpc" / "summary.json").read_text())["evaluation"]
    sites = figures["sites"]
    assert sorted(sites) == ["site-01", "site-02", "site-03"]
    samples = sum(s["num_samples"] for s in sites.values())
    mean = sum(s["num_samples"] * s["global_accuracy"] for s in sites.values()) / samples
    assert figures["weighted_mean"]["global_accuracy"] == pytest.approx(mean, rel=1e-12)
    # the same figures as in simulation, site by site
    final = result.history[-1]  # type: ignore[attr-defined]
    for r in final.results:
        assert sites[r.site]["global_accuracy"] == r.metrics["global_accuracy"]
    for site in sites:
        assert site in done.stdout
    assert "weighted mean" in done.stdout and f"{mean:.4f}" in done.stdout
    assert figures["test"] == result.test_metrics  # type: ignore[attr-defined]


PERSONAL = ["rounds=3", "sites=4", "data.partition=shards:1", "training.personal.lam=0.1"]


@pytest.mark.process
def test_the_matrix_puts_each_sites_local_model_at_every_site(tmp_path: Path) -> None:
    """Label skew (each site one class): each site's personal model does best at home."""
    ws = make_workspace(tmp_path, "breast-cancer", "ws")
    trained = run_cli("simulate", str(ws), *PERSONAL, "--workers", "0", "--run-name", "d")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    run = ws / "runs" / "d"
    done = run_cli("evaluate", str(ws), *PERSONAL, "--matrix", str(run), "--workers", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads((run / "summary.json").read_text())["cross_site"]
    sites, values = found["sites"], found["values"]
    assert sites == ["site-01", "site-02", "site-03", "site-04"] and found["models"] == "personal"
    n = len(sites)
    diagonal = sum(values[i][i] for i in range(n)) / n
    off = sum(values[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)
    assert found["diagonal_mean"] == pytest.approx(diagonal)
    assert found["off_diagonal_mean"] == pytest.approx(off)
    assert diagonal > off
    assert (run / "cross_site.png").stat().st_size > 0
    assert f"diagonal (each model at its own site) {diagonal:.4f}" in done.stdout
    # a row is that site's model evaluated as `--model` would: the same figures
    plan = load_plan(ws, PERSONAL)
    mine = load_model(run / "sites" / "site-03" / "personal.safetensors")
    alone = simulate(ws, plan, SimulationOptions(workers=0, model=mine))
    by_site = {r.site: r.metrics["global_accuracy"] for r in alone.history[-1].results}
    assert values[2] == [by_site[s] for s in sites]

    other = run_cli("evaluate", str(ws), "rounds=3", "--matrix", str(run), "--workers", "0")
    assert other.returncode == 3 and "ran another plan" in other.stderr
    grpc = run_cli("evaluate", str(ws), *PERSONAL, "--matrix", str(run), "--transport", "grpc")
    assert grpc.returncode == 2 and "--matrix: only in simulation" in grpc.stderr


def test_a_plan_naming_an_initial_model_starts_from_it_and_its_hash_covers_the_file(
    trained: tuple[Path, Path, object], tmp_path: Path
) -> None:
    """model.initial: the first round's global model is the file's (the sites find the
    figures the run that trained it found at its end); the plan hash covers the bytes; a
    file of another model is refused before any round, naming the tensors."""
    from fedloom.plan import plan_hash

    ws, model, result = trained
    (ws / "pretrained").mkdir()
    (ws / "pretrained" / "model.safetensors").write_bytes(model.read_bytes())
    plan = load_plan(ws, ["rounds=1", "sites=3", "model.initial=pretrained/model.safetensors"])
    started = simulate(ws, plan, SimulationOptions(workers=0))
    first = started.history[0]
    assert first.kind is InstructionKind.TRAIN
    final = result.history[-1]  # type: ignore[attr-defined]
    assert {r.site: r.metrics["global_accuracy"] for r in first.results} == {
        r.site: r.metrics["global_accuracy"] for r in final.results
    }
    fresh = load_plan(ws, ["rounds=1", "sites=3"])
    assert plan_hash(plan, ws) != plan_hash(fresh, ws)
    before = plan_hash(plan, ws)
    weights = load_model(model)
    save_weights(ws / "pretrained" / "model.safetensors", {k: v * 2 for k, v in weights.items()})
    assert plan_hash(plan, ws) != before  # other bytes, another plan

    other = {"w": np.zeros((3, 3), np.float32)}
    save_weights(ws / "pretrained" / "model.safetensors", other)
    with pytest.raises(TaskError, match=r"model.initial .* is not this task's model: tensor"):
        simulate(ws, plan, SimulationOptions(workers=0))
