"""User-level differential privacy (DP-FedAvg): clipping, noise calibrated to the bound,
the accountant, the budget that stops training, adaptive clipping, distributed noise
under secure aggregation, and the site's policy refusing a plan before any data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from workspaces import make_workspace, run_cli

from fedloom.core.events import Resume
from fedloom.core.records import CloseReason, Instruction, InstructionKind, SiteAnswer
from fedloom.core.weights import Weights
from fedloom.privacy import dp as dpmath
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.settings import (
    AdaptiveClipPlan,
    DPPlan,
    NoisePlacement,
    PrivacyPlan,
    SecureAggregationPlan,
)
from fedloom.privacy.site import SitePrivacy

SITES = tuple(f"site-{i:02d}" for i in range(1, 11))
SHAPE = (50, 100)  # 5,000 values per tensor: a sharp estimate of the noise's spread


def model() -> Weights:
    return {"w": np.zeros(SHAPE, dtype=np.float64)}


class Runner:
    """Every site sends the same update of L2 norm ``norm`` (so its clipped value is
    known exactly)."""

    def __init__(self, norm: float) -> None:
        direction = np.ones(SHAPE) / math.sqrt(np.prod(SHAPE))
        self.delta = direction * norm

    def __call__(self, instruction: Instruction, weights: Weights) -> SiteAnswer:
        if instruction.kind is InstructionKind.EVALUATE:
            return SiteAnswer(10, {"loss": 1.0}, None)
        return SiteAnswer(10, {"loss": 1.0}, {"w": self.delta.copy()})


def run(make_federation: Any, plan: PrivacyPlan, *, norm: float, rounds: int, **kw: Any) -> Any:
    privacy = AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100)
    fed = make_federation(
        model(),
        privacy=privacy,
        roster=SITES,
        rounds=rounds,
        sites_per_round=len(SITES),
        max_samples=100,
        **kw,
    )
    for site in SITES:
        fed.start_site(
            site,
            Runner(norm),
            privacy=SitePrivacy(site, plan, per_round=len(SITES), max_samples=100),
        )
    fed.start()
    return fed


# ------------------------------------------------------------------ pure maths


def test_clipping_bounds_the_norm_and_leaves_small_updates_alone() -> None:
    big = {"a": np.full(10, 3.0), "b": np.full((2, 2), -4.0)}
    clipped, norm = dpmath.clip_update(big, 1.5)
    assert norm == pytest.approx(math.sqrt(90 + 64))
    assert dpmath.l2_norm(clipped) == pytest.approx(1.5)
    assert np.allclose(clipped["a"] / clipped["a"][0], 1.0)  # the direction is kept
    small = {"a": np.full(4, 0.1)}
    same, _ = dpmath.clip_update(small, 1.5)
    assert np.array_equal(same["a"], small["a"])


def test_the_accountant_composes_rounds_and_stays_below_the_classic_bound() -> None:
    delta = 1e-5
    eps = [dpmath.epsilon([1.0] * t, delta) for t in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2]
    assert dpmath.epsilon([2.0] * 20, delta) < eps[2] < dpmath.epsilon([0.5] * 20, delta)
    for t, e in zip((1, 5, 20), eps, strict=True):
        # RDP of the Gaussian mechanism: t * alpha / (2 z**2); the classic conversion
        # gives an upper bound on what the accountant may report
        classic = min(
            t * a / 2 + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 5000)
        )
        assert 0 < e <= classic + 1e-9
    assert dpmath.epsilon([], delta) == 0.0
    assert dpmath.epsilon([0.0], delta) == math.inf


def test_adaptive_clipping_keeps_the_pair_of_mechanisms_at_the_planned_multiplier() -> None:
    # the count moves by 1 (one site's bit flips): its multiplier is its std over 1
    z_update = dpmath.update_noise_multiplier(1.0, 2.0)
    assert z_update == pytest.approx(2 / math.sqrt(3))
    assert (z_update**-2 + 2.0**-2) ** -0.5 == pytest.approx(1.0)
    assert dpmath.round_noise_multiplier(z_update, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must exceed the noise multiplier"):
        dpmath.update_noise_multiplier(1.0, 1.0)


# ------------------------------------------------------------- in federation


def test_central_noise_has_the_calibrated_spread_and_comes_from_secret_randomness(
    make_federation: Any,
) -> None:
    plan = PrivacyPlan(dp=DPPlan(noise_multiplier=1.0, clip=0.5))
    models = []
    for _ in range(2):  # the same plan and seed twice
        fed = run(make_federation, plan, norm=2.0, rounds=1)
        history = fed.finish()
        models.append(fed.aggregator.weights["w"])
        assert history[0].privacy["epsilon"] == pytest.approx(dpmath.epsilon([1.0], 1e-5))
    clipped_mean = np.ones(SHAPE) / math.sqrt(np.prod(SHAPE)) * 0.5  # every update clipped
    for w in models:
        noise = w - clipped_mean
        # std of the noise on the mean: z * clip / m = 1.0 * 0.5 / 10
        assert np.std(noise) == pytest.approx(0.05, rel=0.05)
        assert abs(np.mean(noise)) < 0.005
    assert not np.array_equal(models[0], models[1])  # not from the plan's seed


def test_training_stops_cleanly_before_the_round_that_would_break_the_budget(
    make_federation: Any,
) -> None:
    budget = dpmath.epsilon([1.0] * 3, 1e-5) + 0.01  # room for 3 rounds, not 4
    plan = PrivacyPlan(dp=DPPlan(noise_multiplier=1.0, clip=1.0, epsilon_budget=budget))
    fed = run(make_federation, plan, norm=0.5, rounds=10)
    history = fed.finish()
    trained = [r for r in history if r.kind is InstructionKind.TRAIN]
    assert [r.round for r in trained] == [1, 2, 3]
    assert history[-1].kind is InstructionKind.EVALUATE  # the final evaluation still ran
    assert history[-1].close_reason is CloseReason.ALL_ANSWERED
    epsilons = [r.privacy["epsilon"] for r in trained]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= budget
    reason = fed.aggregator.stopped_early
    assert reason is not None and "epsilon_budget" in reason and "after 3 round(s)" in reason
    live = fed.aggregator.snapshot()["privacy"]  # what `fedloom status` shows
    assert live["epsilon"] == epsilons[-1] and live["rounds"] == 3
    assert live["epsilon_budget"] == budget


def test_the_budget_continues_across_a_restart(make_federation: Any) -> None:
    plan = PrivacyPlan(dp=DPPlan(noise_multiplier=1.0, clip=1.0))
    first = run(make_federation, plan, norm=0.5, rounds=2, final_evaluation=False)
    first.finish()
    state = first.aggregator.state
    assert state.ledger["noise"] == [1.0, 1.0]
    # a restarted aggregator resumes from that state for rounds 3 and 4
    privacy = AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100)
    fed = make_federation(
        model(),
        privacy=privacy,
        roster=SITES,
        rounds=4,
        sites_per_round=len(SITES),
        max_samples=100,
        final_evaluation=False,
        resume=Resume(state=state, next_round=3, history=tuple(first.aggregator.history)),
    )
    for site in SITES:
        plan_site = SitePrivacy(site, plan, per_round=len(SITES), max_samples=100)
        fed.start_site(site, Runner(0.5), privacy=plan_site)
    fed.start()
    history = fed.finish()
    assert [round(r.privacy["epsilon"], 9) for r in history] == [
        round(dpmath.epsilon([1.0] * t, 1e-5), 9) for t in (1, 2, 3, 4)
    ]


def test_adaptive_clipping_moves_the_bound_towards_the_target_quantile(
    make_federation: Any,
) -> None:
    adaptive = AdaptiveClipPlan(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=1.0)
    plan = PrivacyPlan(dp=DPPlan(noise_multiplier=0.5, clip=0.1, adaptive_clip=adaptive))
    fed = run(make_federation, plan, norm=5.0, rounds=4, final_evaluation=False)
    history = fed.finish()
    clips = [r.privacy["clip"] for r in history]  # the bound each round used
    # every update is above the bound: the bound grows by about exp(0.2 * 0.5) a round
    # (the noise on the count of 10 sites, std 1/10, moves it a little)
    assert clips[0] == 0.1 and all(b > a for a, b in zip(clips, clips[1:], strict=False))
    assert clips[-1] == pytest.approx(0.1 * math.exp(0.1 * 3), rel=0.25)
    ledger = fed.aggregator.state.ledger
    assert ledger["clips"] == clips and ledger["clip"] > clips[-1]  # the next round's


def test_distributed_noise_under_secure_aggregation(make_federation: Any) -> None:
    plan = PrivacyPlan(
        dp=DPPlan(noise_multiplier=1.0, clip=0.5, noise=NoisePlacement.DISTRIBUTED),
        secure_aggregation=SecureAggregationPlan(bits=32),
    )
    fed = run(make_federation, plan, norm=2.0, rounds=1, final_evaluation=False)
    [record] = fed.finish()
    assert record.close_reason is CloseReason.ALL_ANSWERED
    assert record.privacy["noise_multiplier"] == pytest.approx(1.0)  # every share arrived
    clipped_mean = np.ones(SHAPE) / math.sqrt(np.prod(SHAPE)) * 0.5
    noise = fed.aggregator.weights["w"] - clipped_mean
    # each site added std z*C/sqrt(m); the sum has z*C, the mean z*C/m = 0.05
    assert np.std(noise) == pytest.approx(0.05, rel=0.05)


def test_plans_that_cannot_be_private_are_refused_with_the_fix() -> None:
    from fedloom.core.errors import PlanError
    from fedloom.plan import validate_plan

    with pytest.raises(PlanError) as err:
        validate_plan({"sites": 5, "privacy": {"dp": {"noise": "distributed"}}})
    assert "add privacy.secure_aggregation" in str(err.value)
    with pytest.raises(PlanError) as err:
        validate_plan({"sites": 5, "strategy": {"name": "median"}, "privacy": {"dp": {}}})
    assert "choose a mean-based strategy" in str(err.value)
    with pytest.raises(PlanError) as err:
        validate_plan(
            {"sites": 5, "privacy": {"dp": {"adaptive_clip": {"count_noise_multiplier": 0.2}}}}
        )
    assert "count_noise_multiplier" in str(err.value)


# ---------------------------------------------------------- end to end (CLI)


@pytest.mark.process
@pytest.mark.slow
def test_a_dp_simulation_reports_epsilon_per_round_in_metrics_and_summary(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    run_cli(
        "simulate", str(ws), "--sites", "10", "--rounds", "4", "--run-name", "dp", "--quiet",
        "privacy.dp.noise_multiplier=1.0", "privacy.dp.clip=0.5", "privacy.dp.epsilon_budget=50",
    )  # fmt: skip
    run = ws / "runs" / "dp"
    summary = json.loads((run / "summary.json").read_text())
    want = [dpmath.epsilon([1.0] * t, 1e-5) for t in (1, 2, 3, 4)]
    assert summary["epsilon"] == pytest.approx(want[-1])
    assert summary["delta"] == 1e-5
    assert [summary["epsilon_by_round"][str(r)] for r in (1, 2, 3, 4)] == pytest.approx(want)
    assert summary["test_accuracy"] > 0.6
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_round = {r["round"]: r.get("epsilon") for r in rows if r["kind"] == "train"}
    assert [by_round[r] for r in (1, 2, 3, 4)] == pytest.approx(want)


@pytest.mark.process
@pytest.mark.slow
def test_a_collaborator_refuses_a_plan_its_policy_forbids_before_any_data_or_code(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    marker = tmp_path / "task-code-ran"
    task = ws / "task.py"
    task.write_text(
        f"open({str(marker)!r}, 'w').close()  # proof that the task's code ran\n" + task.read_text()
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nmax_rounds: 50\ndp:\n  required: true\n  min_noise_multiplier: 0.8\n"
    )
    missing_data = tmp_path / "no-such-data.npz"  # read first, it would fail differently
    out = run_cli(
        "collaborator", "start", str(ws), "--name", "site-01", "--aggregator", "127.0.0.1:1",
        "--data", str(missing_data), "--policy", str(policy),
    )  # fmt: skip
    assert out.returncode == 12, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "dp.required" in text and "privacy.dp" in text  # the rule, and what to set
    assert not marker.exists()  # the task's code never ran, no data was read
    check = run_cli("policy", "check", str(ws), "--policy", str(policy))
    assert check.returncode == 12
    assert "dp.required" in check.stdout + check.stderr
    # the same plan with DP passes both
    allowed = ["privacy.dp.noise_multiplier=1.0"]
    check = run_cli("policy", "check", str(ws), *allowed, "--policy", str(policy))
    assert check.returncode == 0, check.stdout + check.stderr


def test_distributed_noise_fits_the_encoding_and_the_budget_assumes_the_least_noise() -> None:
    from fedloom.core.errors import PlanError
    from fedloom.plan import validate_plan

    dp = {"noise_multiplier": 1.0, "clip": 0.5, "noise": "distributed"}
    plan = validate_plan({"sites": 4, "privacy": {"dp": dp, "secure_aggregation": True}})
    # a share's std is z*C/sqrt(4) = 0.25: the range leaves room for 6 of them
    assert plan.privacy.clip_range(4) == pytest.approx(0.5 + 6 * 0.25)
    with pytest.raises(PlanError, match="clip the sites' shares of distributed noise"):
        validate_plan(
            {"sites": 4, "privacy": {"dp": dp, "secure_aggregation": {"clip_range": 0.6}}}
        )
    # with a quorum of 5 of 10, a round may end with half the shares: the budget check
    # counts the next round as z*sqrt(5/10), so dropouts never overshoot the budget
    full = [1.0, 1.0, 1.0]
    budget = dpmath.epsilon([*full, math.sqrt(0.5)], 1e-5) - 1e-6
    assert dpmath.epsilon([*full, 1.0], 1e-5) < budget  # a full fourth round would fit
    private = PrivacyPlan(
        dp=DPPlan(noise_multiplier=1.0, noise=NoisePlacement.DISTRIBUTED, epsilon_budget=budget),
        secure_aggregation=SecureAggregationPlan(),
    )
    privacy = AggregatorPrivacy(private, per_round=10, max_samples=100, min_sites=5)
    ledger = {"clip": 1.0, "noise": full, "epsilon": dpmath.epsilon(full, 1e-5)}
    reason = privacy.stop_reason(ledger)
    assert reason is not None and "epsilon_budget" in reason  # ... but one with 5 might not
    assert privacy.stop_reason(None) is None


@pytest.mark.process
@pytest.mark.slow
def test_sample_level_dp_sgd_reports_each_sites_own_epsilon(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "digits")  # a torch task
    out = run_cli(
        "simulate", str(ws), "--sites", "2", "--rounds", "2", "--run-name", "dpsgd", "--quiet",
        "privacy.dp_sgd.noise_multiplier=1.0", "privacy.dp_sgd.max_grad_norm=1.0",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [
        json.loads(line)
        for line in (ws / "runs" / "dpsgd" / "metrics.jsonl").read_text().splitlines()
    ]
    by_site: dict[str, list[float]] = {}
    for row in rows:
        if row["kind"] == "train":
            by_site.setdefault(row["site"], []).append(row["dp_sgd_epsilon"])
            assert row["dp_sgd_delta"] == 1e-5
    assert sorted(by_site) == ["site-01", "site-02"]
    for epsilons in by_site.values():
        assert 0 < epsilons[0] < epsilons[1]  # each round adds to the site's own budget
    # a task that cannot clip per record is refused before any round, with the reason
    bc = make_workspace(tmp_path, "breast-cancer")
    out = run_cli("simulate", str(bc), "--quiet", "privacy.dp_sgd.noise_multiplier=1.0")
    assert out.returncode == 4
    assert "needs a torch task" in out.stdout + out.stderr


def test_a_site_counts_its_own_updates_and_refuses_one_past_its_limit(tmp_path: Path) -> None:
    from fedloom.core.errors import PolicyError
    from fedloom.privacy.budget import SiteBudget

    limit = dpmath.epsilon([1.0] * 2, 1e-5) + 1e-6  # two updates fit, not three
    path = tmp_path / "privacy-spent.json"

    def budget(plan_hash: str) -> SiteBudget:
        return SiteBudget(path, plan_hash=plan_hash, noise_multiplier=1.0, delta=1e-5, limit=limit)

    assert budget("a" * 64).charge(1) == pytest.approx(dpmath.epsilon([1.0], 1e-5))
    budget("a" * 64).charge(2)  # a new process (a restarted collaborator) keeps counting
    with pytest.raises(PolicyError, match="privacy budget is spent") as err:
        budget("a" * 64).charge(3)
    assert "2 update(s) already sent" in str(err.value)
    assert budget("a" * 64).sent() == 2  # the refused one was not counted
    assert budget("b" * 64).charge(1) > 0  # another plan has its own count
    path.write_text("not json")
    with pytest.raises(PolicyError, match="cannot read"):
        budget("a" * 64).charge(4)


@pytest.mark.parametrize("name", ["fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_the_ledger_survives_every_mean_based_strategys_state(
    make_federation: Any, name: str
) -> None:
    from fedloom.strategies import STRATEGIES

    plan = PrivacyPlan(dp=DPPlan(noise_multiplier=1.0, clip=0.5))
    privacy = AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100)
    fed = make_federation(
        model(), strategy=STRATEGIES[name](), privacy=privacy, roster=SITES, rounds=3,
        sites_per_round=len(SITES), max_samples=100, final_evaluation=False,
    )  # fmt: skip
    for site in SITES:
        fed.start_site(
            site,
            Runner(2.0),
            privacy=SitePrivacy(site, plan, per_round=len(SITES), max_samples=100),
        )
    fed.start()
    history = fed.finish()
    ledger = fed.aggregator.state.ledger
    assert ledger["noise"] == [1.0, 1.0, 1.0]
    assert [r.privacy["epsilon"] for r in history] == pytest.approx(
        [dpmath.epsilon([1.0] * t, 1e-5) for t in (1, 2, 3)]
    )
    assert fed.aggregator.state.strategy.scalars == {"step": 3}  # the strategy's own only


def test_the_ledger_is_checkpointed_with_the_strategy_state_and_old_checkpoints_still_load(
    tmp_path: Path,
) -> None:
    from fedloom.core.state import FederationState, StrategyState
    from fedloom.store.checkpoint import (
        load_federation_state,
        read_metadata,
        save_federation_state,
        save_state,
    )

    ledger = {"clip": 0.5, "noise": [1.0, 1.1], "epsilon": 2.25, "clips": [0.5, 0.5]}
    strategy = StrategyState(weights=model(), scalars={"step": 2})
    save_federation_state(tmp_path / "now.safetensors", FederationState(strategy, ledger))
    back = load_federation_state(tmp_path / "now.safetensors")
    assert back.ledger == ledger and back.strategy.scalars == {"step": 2}
    assert json.loads(read_metadata(tmp_path / "now.safetensors")["fedloom.scalars"]) == {"step": 2}
    # before the ledger had its own key, the strategy's scalars carried it as "privacy"
    old = strategy.evolve(scalars={"step": 2, "privacy": ledger})
    save_state(tmp_path / "old.safetensors", old)
    back = load_federation_state(tmp_path / "old.safetensors")
    assert back.ledger == ledger and back.strategy.scalars == {"step": 2}
    assert load_federation_state(tmp_path / "now.safetensors").weights.keys() == model().keys()
