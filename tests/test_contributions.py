"""Contribution scores: the Shapley estimate against the definition on games whose
values are known, leave-one-out's, and a federation in which a site of pure label noise
is found worth least, through the API and through `fedloom contributions`."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from workspaces import run_cli

from fedloom import load_plan, simulate
from fedloom.simulation.contributions import (
    CachedUtility,
    leave_one_out,
    shapley_exact,
    shapley_monte_carlo,
)
from fedloom.simulation.options import SimulationOptions
from fedloom.simulation.valuation import coalition_runs, site_contributions

SITES = ["a", "b", "c", "d"]


def random_game(values: list[float]) -> CachedUtility:
    """A game with an arbitrary value for each of the 16 coalitions of SITES."""
    table = {
        frozenset(c): values[i]
        for i, c in enumerate(
            c for size in range(len(SITES) + 1) for c in itertools.combinations(SITES, size)
        )
    }
    return CachedUtility(lambda coalition: table[coalition])


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1, 1), min_size=16, max_size=16),
    seed=st.integers(0, 2**32 - 1),
    permutations=st.integers(1, 5),
)
def test_every_estimate_shares_out_exactly_what_the_federation_gained(
    values: list[float], seed: int, permutations: int
) -> None:
    game = random_game(values)
    gained = game(frozenset(SITES)) - game(frozenset())
    estimate = shapley_monte_carlo(game, SITES, permutations, np.random.default_rng(seed))
    assert math.isclose(sum(estimate.values()), gained, abs_tol=1e-9)
    assert math.isclose(sum(shapley_exact(game, SITES).values()), gained, abs_tol=1e-9)


def test_the_estimate_converges_to_the_definition() -> None:
    rng = np.random.default_rng(7)
    game = random_game(list(rng.uniform(-1, 1, 16)))
    exact = shapley_exact(game, SITES)
    estimate = shapley_monte_carlo(game, SITES, 4000, np.random.default_rng(1))
    for site in SITES:
        assert estimate[site] == pytest.approx(exact[site], abs=0.03)


def test_an_additive_game_is_scored_exactly_by_every_method() -> None:
    worth = {"a": 0.5, "b": -0.25, "c": 0.0, "d": 1.0}
    game = CachedUtility(lambda coalition: 0.1 + sum(worth[s] for s in coalition))
    assert leave_one_out(game, SITES) == pytest.approx(worth)
    assert shapley_exact(game, SITES) == pytest.approx(worth)
    one = shapley_monte_carlo(game, SITES, 1, np.random.default_rng(0))
    assert one == pytest.approx(worth)
    # truncation stops an ordering once it is within 0.3 of the whole: c, then d's gain of
    # 1.0 brings it there, so what follows d counts 0
    truncated = shapley_monte_carlo(game, SITES, 1, np.random.default_rng(0), truncation=0.3)
    assert sum(truncated.values()) == pytest.approx(sum(worth.values()), abs=0.3)
    assert coalition_runs(4, ["loo", "shapley"], 100) == 14


TASK = """
import numpy as np
from sklearn.datasets import load_digits

from fedloom.tasks import SiteData, SoftmaxRegression

NOISY = 3  # this site's labels are pure noise


def _digits():
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    return (digits.data[order] / 16.0).astype(np.float32), digits.target[order].astype(np.int64)


class Digits(SoftmaxRegression):
    def load_data(self, ctx):
        x, y = _digits()
        x, y = x[ctx.index : 1000 : 4], y[ctx.index : 1000 : 4].copy()
        if ctx.index == NOISY:
            y = np.random.default_rng(ctx.index).integers(0, 10, len(y))
        return SiteData(x[:200], y[:200], x[200:], y[200:])

    def load_test_data(self, ctx):
        x, y = _digits()
        return x[1400:], y[1400:]


task = Digits(num_features=64, num_classes=10)
"""

PLAN = """version: 1
name: noisy-site
task: task.py
seed: 0
rounds: 3
sites: 4
data:
  dataset: custom
training:
  epochs: 1
  batch_size: 16
  lr: 0.1
evaluation:
  each_round: false
  final: false
"""


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "task.py").write_text(TASK)
    (ws / "federation.yaml").write_text(PLAN)
    return ws


def test_a_site_of_pure_label_noise_is_worth_least(workspace: Path) -> None:
    plan = load_plan(workspace)
    whole = simulate(workspace, plan, SimulationOptions(workers=0, test_initial=True))
    trained: list[frozenset[str]] = []
    scores = site_contributions(
        workspace,
        plan,
        SimulationOptions(workers=0),
        whole,
        permutations=3,
        on_run=lambda coalition, value: trained.append(coalition),
    )
    assert scores.ranking()[-1] == "site-04"
    assert min(scores.by_method["loo"], key=scores.by_method["loo"].__getitem__) == "site-04"
    shapley = scores.by_method["shapley"]
    assert shapley["site-04"] < min(shapley[s] for s in ("site-01", "site-02", "site-03"))
    # each coalition trained once, never the whole federation or the empty one again
    assert len(trained) == len(set(trained)) == scores.runs
    assert frozenset(plan.roster) not in trained and frozenset() not in trained
    # a coalition's run is the plan's run with the others left out: the 3-site one equals
    # the plan with site-04 never selected, whatever the other sites' data
    without = simulate(
        workspace, plan, SimulationOptions(workers=0, sites=("site-01", "site-02", "site-03"))
    )
    loo = whole.test_metrics["accuracy"] - without.test_metrics["accuracy"]
    assert scores.by_method["loo"]["site-04"] == pytest.approx(loo)


@pytest.mark.process
def test_the_command_writes_the_scores_into_the_summary_and_a_chart(workspace: Path) -> None:
    done = run_cli(
        "contributions",
        str(workspace),
        "--permutations",
        "2",
        "--workers",
        "0",
        "--run-name",
        "c",
        cwd=workspace.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((workspace / "runs" / "c" / "summary.json").read_text())
    scores = summary["contributions"]
    assert scores["metric"] == "test_accuracy" and scores["methods"] == ["loo", "shapley"]
    assert set(scores["sites"]) == {"site-01", "site-02", "site-03", "site-04"}
    assert scores["full"] == summary["test_accuracy"]
    assert (workspace / "runs" / "c" / "contributions.png").stat().st_size > 0
    assert "Contribution to test_accuracy" in done.stdout
