"""Ditto (training.personal): each site's personal model against a naive reference of
Li et al.'s Algorithm 1; the global model stays FedAvg's, bit for bit; the personal
figures reach the summary; and the tasks and plans it refuses."""

from __future__ import annotations

from pathlib import Path

import naive_softmax as naive
import numpy as np
import pytest

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.core.errors import PlanError, TaskError
from fedloom.core.records import Instruction, InstructionKind, PersonalSettings, TrainSettings
from fedloom.core.weights import weights_equal
from fedloom.report import summary
from fedloom.runtime.executor import SiteEnv, execute
from fedloom.runtime.personal import PERSONAL_FILE
from fedloom.store.checkpoint import load_weights
from fedloom.tasks import SiteData
from fedloom.tasks.numpy_task import SoftmaxRegression

LAM, PERSONAL_EPOCHS = 0.5, 3


def naive_ditto() -> tuple[np.ndarray, list[np.ndarray]]:
    """FedAvg for the global model and, at each site each round, ``PERSONAL_EPOCHS`` of
    SGD on ``F_i(v) + (LAM / 2) * ||v - w||^2`` from the site's last ``v`` (the global
    model the first time), ``w`` the global model the site received that round."""
    data = [naive.site_arrays()(i) for i in range(len(naive.SITES))]
    total = sum(len(y) for _, y in data)
    w = np.zeros((5 + 1, 4))
    personal: list[np.ndarray | None] = [None] * len(naive.SITES)
    for rnd in range(1, naive.ROUNDS + 1):
        step = np.zeros_like(w)
        for i, site in enumerate(naive.SITES):
            x, y = data[i]
            trained, _ = naive.local_sgd(w, x, y, naive.train_seed(rnd, site))
            step += len(y) / total * (trained - w)
            start = w if personal[i] is None else personal[i]
            assert start is not None
            seed = naive.train_seed(rnd, site, "personal")
            personal[i], _ = naive.local_sgd(
                start, x, y, seed, epochs=PERSONAL_EPOCHS, anchor=w, lam=LAM
            )
        w = w + step
    return w, [v for v in personal if v is not None]


def test_each_personal_model_is_the_naive_one_and_the_global_model_is_fedavgs(
    tmp_path: Path,
) -> None:
    workspace = naive.workspace(tmp_path)
    want_global, want_personal = naive_ditto()
    ditto = [f"training.personal.lam={LAM}", f"training.personal.epochs={PERSONAL_EPOCHS}"]
    sites = tmp_path / "sites"
    options = SimulationOptions(workers=0, state_root=sites)
    plan = load_plan(workspace, [*ditto, "evaluation.final=true"])
    result = simulate(workspace, plan, options)
    for i, site in enumerate(naive.SITES):
        mine = load_weights(sites / site / PERSONAL_FILE)
        np.testing.assert_allclose(naive.as_rows(mine), want_personal[i], atol=2e-5)
    np.testing.assert_allclose(naive.as_rows(result.final_weights), want_global, atol=2e-5)
    # the personal models never touch the global one: FedAvg's, bit for bit
    plain = simulate(workspace, load_plan(workspace, ["evaluation.final=true"]), options)
    assert weights_equal(plain.final_weights, result.final_weights)
    # each site's final evaluation reports its personal model too, and the summary says so
    figures = summary(result, "ditto")
    final = [r for r in result.history if r.kind is InstructionKind.EVALUATE][-1]
    assert {r.site for r in final.results if "personal_accuracy" in r.metrics} == set(naive.SITES)
    assert figures["mean_personal_accuracy"] > figures["mean_site_accuracy"]
    assert "mean_personal_accuracy" not in summary(plain, "plain")


class _NoPull(SoftmaxRegression):
    supports_ditto = False


def test_a_task_that_cannot_pull_towards_the_global_model_is_refused(tmp_path: Path) -> None:
    x, y = np.zeros((4, 5), np.float32), np.zeros(4, np.int64)
    task = _NoPull(num_features=5, num_classes=4)
    env = SiteEnv(state_dir=tmp_path, personal=PersonalSettings())
    instruction = Instruction(1, InstructionKind.TRAIN, TrainSettings(evaluate=False))
    with pytest.raises(TaskError, match="personal model at each site"):
        execute(
            task,
            instruction,
            task.init_weights(0),
            SiteData(x, y, x, y),
            site="s",
            index=0,
            plan_seed=0,
            env=env,
        )


def test_a_personal_model_with_dp_sgd_is_refused_by_the_plan(tmp_path: Path) -> None:
    workspace = naive.workspace(tmp_path)
    dp_sgd = ["privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.max_grad_norm=1.0"]
    with pytest.raises(PlanError, match="training.personal: the personal model"):
        load_plan(workspace, ["training.personal.lam=0.1", *dp_sgd])
