"""SCAFFOLD: the site's control-variate step against the paper's formula; a whole
simulated federation (the real strategy, executor, accumulator, secure aggregation)
against a naive reference of Karimireddy et al.'s Algorithm 1; the variate a site keeps
across a round opened again; and the plans and tasks it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import naive_softmax as naive
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.core.errors import PlanError, TaskError
from fedloom.core.records import Instruction, InstructionKind, TrainSettings
from fedloom.runtime.executor import SiteEnv, execute
from fedloom.runtime.scaffold_site import VARIATE_FILE, site_variates
from fedloom.strategies.scaffold import CONTROL, site_control, with_controls
from fedloom.tasks import SiteData


def naive_scaffold() -> np.ndarray:
    """Algorithm 1 of the paper (option II, every site every round, global step 1),
    with the server's averages weighted by the sites' samples, on the naive float64
    SoftmaxRegression."""
    data = [naive.site_arrays()(i) for i in range(len(naive.SITES))]
    x_glob = np.zeros((5 + 1, 4))
    c = np.zeros_like(x_glob)
    c_sites = [np.zeros_like(x_glob) for _ in naive.SITES]
    total = sum(len(y) for _, y in data)
    for rnd in range(1, naive.ROUNDS + 1):
        dy_sum, dc_sum, new_c = np.zeros_like(x_glob), np.zeros_like(x_glob), []
        for i, site in enumerate(naive.SITES):
            x, y = data[i]
            seed = naive.train_seed(rnd, site)
            w, k = naive.local_sgd(x_glob, x, y, seed, drift=c - c_sites[i])
            c_plus = c_sites[i] - c + (x_glob - w) / (k * naive.LR)
            share = len(y) / total
            dy_sum += share * (w - x_glob)
            dc_sum += share * (c_plus - c_sites[i])
            new_c.append(c_plus)
        x_glob, c, c_sites = x_glob + dy_sum, c + dc_sum, new_c
    return x_glob


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5), min_size=4, max_size=4),
    steps=st.integers(1, 300),
    lr=st.floats(1e-3, 1.0),
)
def test_the_site_variate_is_option_two(values: list[float], steps: int, lr: float) -> None:
    ci, c, x, y = ([v] for v in values)
    got = site_control(
        {"w": np.array(ci)}, {"w": np.array(c)}, {"w": np.array(x)}, {"w": np.array(y)}, steps, lr
    )
    want = ci[0] - c[0] + (x[0] - y[0]) / (steps * lr)
    assert got["w"].dtype == np.float32
    np.testing.assert_allclose(got["w"], [want], rtol=1e-6, atol=1e-6)


def test_a_simulated_federation_is_the_naive_algorithm_with_and_without_secure_aggregation(
    tmp_path: Path,
) -> None:
    workspace = naive.workspace(tmp_path, "scaffold")
    want = naive_scaffold()
    for extra in ([], ["privacy.secure_aggregation=true"]):
        sites = workspace / f"sites{len(extra)}"
        options = SimulationOptions(workers=0, state_root=sites)
        final = simulate(workspace, load_plan(workspace, extra), options).final_weights
        assert list(final) == ["weight", "bias"]  # the controls never leave the aggregator
        np.testing.assert_allclose(naive.as_rows(final), want, atol=2e-5)
        assert (sites / "site-02" / VARIATE_FILE).is_file()
    fedavg = simulate(workspace, load_plan(workspace, ["strategy.name=fedavg"]), options)
    assert not np.allclose(naive.as_rows(fedavg.final_weights), want, atol=1e-3)


class _Once:
    """A task of the test's own: one SGD step towards 1 from wherever it starts."""

    supports_scaffold = True

    def train(self, weights: Any, data: Any, settings: Any, context: Any) -> Any:
        from fedloom.core.records import TrainOutput

        w = weights["w"] - settings.lr * ((weights["w"] - 1.0) + context.correction["w"])
        return TrainOutput({"w": w.astype(np.float32)}, 4, {}, 1)

    def evaluate(self, weights: Any, data: Any, context: Any) -> Any:
        from fedloom.core.records import EvalOutput

        return EvalOutput(1, {})


def _train(task: Any, state: Path, round: int, c: float) -> dict[str, np.ndarray]:
    weights = with_controls({"w": np.zeros(2, np.float32)}, {"w": np.full(2, c, np.float32)})
    instruction = Instruction(round, InstructionKind.TRAIN, TrainSettings(lr=0.5, evaluate=False))
    x, y = np.zeros((4, 1), np.float32), np.zeros(4, np.int64)
    data = SiteData(x, y, x, y)
    answer = execute(
        task,
        instruction,
        weights,
        data,
        site="s",
        index=0,
        plan_seed=0,
        env=SiteEnv(state_dir=state),
    )
    assert answer.delta is not None
    return dict(answer.delta)


def test_a_round_opened_again_starts_from_the_variate_before_it(tmp_path: Path) -> None:
    first = _train(_Once(), tmp_path, 1, c=0.25)
    again = _train(_Once(), tmp_path, 1, c=0.25)  # a second attempt at round 1
    np.testing.assert_array_equal(first[CONTROL + "w"], again[CONTROL + "w"])
    # c_i+ = 0 - 0.25 + (0 - w) / 0.5, with w = -0.5 * (-1 + 0.25) = 0.375
    np.testing.assert_allclose(again[CONTROL + "w"], [-1.0, -1.0])
    np.testing.assert_allclose(again["w"], [0.375, 0.375])
    kept = site_variates(
        {"w": np.zeros(2)}, supported=True, task_name="t", state_dir=tmp_path, round=2, local=set()
    )
    np.testing.assert_allclose(kept.c_i["w"], [-1.0, -1.0])  # round 2 starts from round 1's


def test_a_task_that_cannot_correct_its_steps_is_refused(tmp_path: Path) -> None:
    class Plain(_Once):
        supports_scaffold = False

    with pytest.raises(TaskError, match="scaffold, which corrects every local gradient step"):
        _train(Plain(), tmp_path, 1, c=0.0)


def test_scaffold_with_dp_is_refused_by_the_plan(tmp_path: Path) -> None:
    workspace = naive.workspace(tmp_path, "scaffold")
    with pytest.raises(PlanError, match="scaffold's control variates"):
        load_plan(workspace, ["privacy.dp.noise_multiplier=1.0", "privacy.dp.clip=1.0"])
