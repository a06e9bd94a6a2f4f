"""The accountants, checked from outside: the ledger against dp-accounting composing the
mechanisms fedloom releases at the sensitivities docs/privacy.md derives, the PLD
accountant's exact Gaussian composition, and budgets checked with the accountant in
force (the aggregator's stop, the site's own count, DP-SGD)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from rich.console import Console
from typer.testing import CliRunner
from workspaces import make_workspace, run_cli

from fedloom.cli.main import app
from fedloom.cli.progress import RoundProgress
from fedloom.core.errors import PlanError, PolicyError
from fedloom.core.events import RoundClosed
from fedloom.core.records import (
    Accountant,
    DPSGDSettings,
    Instruction,
    InstructionKind,
    MeanSummary,
    SiteAnswer,
    SiteResult,
    TrainSettings,
)
from fedloom.plan import Plan, plan_hash, validate_plan
from fedloom.privacy import dp as dpmath
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.budget import SiteBudget
from fedloom.privacy.settings import AdaptiveClipPlan, DPPlan, PrivacyPlan
from fedloom.privacy.site import SitePrivacy
from fedloom.runtime.executor import dp_sgd_of
from fedloom.store.locks import lock_state
from fedloom.store.runs import RunStore
from fedloom.tasks import dp_sgd
from fedloom.transport.traffic import TrafficCounter

SITES = tuple(f"site-{i:02d}" for i in range(1, 11))
DELTA = 1e-5
CLIP = 0.5
# the sensitivities docs/privacy.md derives under its neighbouring relation (a site's
# update replaced by zero, participation public): the clipped sum moves by `clip`, the
# count of unclipped updates by 1 (the site's bit can flip)
SUM_SENSITIVITY = CLIP
COUNT_SENSITIVITY = 1.0


def adaptive_plan(accountant: Accountant = Accountant.RDP, count: float = 2.0) -> PrivacyPlan:
    adaptive = AdaptiveClipPlan(
        target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=count
    )
    return PrivacyPlan(
        dp=DPPlan(noise_multiplier=1.0, clip=CLIP, adaptive_clip=adaptive, delta=DELTA),
        accountant=accountant,
    )


def summary(m: int, values: int, unclipped: float) -> MeanSummary:
    results = tuple(SiteResult(s, 1, 10, 10) for s in SITES[:m])
    mean = {"w": np.zeros(values), dpmath.UNCLIPPED: np.array([unclipped])}
    return MeanSummary(1, mean, float(m), results)


def released(update_std: float, count_std: float, rounds: int) -> dp_event.DpEvent:
    """What `rounds` rounds of adaptive clipping release, as dp-accounting events: per
    round, the Gaussian mechanism on the sum and the one on the count, each at its noise
    standard deviation over its sensitivity."""
    one_round = dp_event.ComposedDpEvent(
        [
            dp_event.GaussianDpEvent(update_std / SUM_SENSITIVITY),
            dp_event.GaussianDpEvent(count_std / COUNT_SENSITIVITY),
        ]
    )
    return dp_event.SelfComposedDpEvent(one_round, rounds)


def ledger_after(privacy: AggregatorPrivacy, rounds: int) -> dict[str, Any]:
    ledger = None
    for _ in range(rounds):
        _, ledger = privacy.finish(summary(10, 4, 0.5), ledger)
        assert ledger is not None
    return privacy.ledger(ledger)


# ------------------------------------------------- point 1: adaptive clipping


def test_adaptive_clipping_adds_the_noise_the_split_says() -> None:
    """What the aggregator really adds: measured, not read from its attributes."""
    privacy = AggregatorPrivacy(adaptive_plan(), per_round=10, max_samples=100)
    m = 10
    noised, ledger = privacy.finish(summary(m, 200_000, 0.5), None)
    # noise on the mean: update_std / m, so on the sum update_std = z_u * clip
    update_std = float(np.std(noised.mean_delta["w"])) * m
    assert update_std == pytest.approx(privacy.update_multiplier * CLIP, rel=0.01)
    assert privacy.update_multiplier == pytest.approx(2 / math.sqrt(3))  # z=1, sigma_b=2
    # the count's noise, read back from the bound's geometric step
    counts = []
    for _ in range(600):
        _, ledger = privacy.finish(summary(m, 1, 0.5), None)
        assert ledger is not None
        step = math.log(ledger["clip"] / CLIP) / -0.2  # lr * (fraction - target)
        counts.append(step * m)  # (0.5 + noise / m - 0.5) * m
    assert float(np.std(counts)) == pytest.approx(2.0, rel=0.12)
    assert privacy.count_std == 2.0


@pytest.mark.parametrize("rounds", [5, 20])
def test_the_adaptive_clipping_ledger_matches_dp_accounting_at_the_derived_sensitivities(
    rounds: int,
) -> None:
    privacy = AggregatorPrivacy(adaptive_plan(), per_round=10, max_samples=100)
    assert privacy.count_std is not None
    ledger = ledger_after(privacy, rounds)
    accountant = rdp.RdpAccountant()
    accountant.compose(released(privacy.update_multiplier * CLIP, privacy.count_std, rounds))
    assert ledger["epsilon"] == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
    # and it is what one Gaussian mechanism of the plan's multiplier costs per round
    assert ledger["epsilon"] == pytest.approx(dpmath.epsilon([1.0] * rounds, DELTA), rel=1e-9)
    assert ledger["noise"] == pytest.approx([1.0] * rounds)


def test_the_adaptive_clipping_ledger_matches_dp_accounting_under_pld() -> None:
    privacy = AggregatorPrivacy(adaptive_plan(Accountant.PLD), per_round=10, max_samples=100)
    assert privacy.count_std is not None
    ledger = ledger_after(privacy, 5)
    pld = PLDAccountant()
    pld.compose(released(privacy.update_multiplier * CLIP, privacy.count_std, 5))
    # dp-accounting's pessimistic discretisation lies a hair above the exact value
    assert ledger["epsilon"] == pytest.approx(pld.get_epsilon(DELTA), rel=1e-5)
    assert ledger["epsilon"] <= pld.get_epsilon(DELTA)


def test_the_old_split_under_counted_and_its_plan_is_now_refused() -> None:
    """z = 1 and a count noise of 1: the split for a count that moves by 1/2 left the
    updates z_u = 1.155, which with a count that moves by 1 costs far more than z = 1."""
    old_z_u = (1.0 - (2 * 1.0) ** -2) ** -0.5
    accountant = rdp.RdpAccountant()
    accountant.compose(released(old_z_u * CLIP, 1.0, 5))
    assert accountant.get_epsilon(DELTA) == pytest.approx(17.5, abs=0.05)
    assert dpmath.epsilon([1.0] * 5, DELTA) == pytest.approx(12.30, abs=0.005)  # recorded
    with pytest.raises(PlanError) as err:
        validate_plan(
            {"sites": 10, "privacy": {"dp": {"adaptive_clip": {"count_noise_multiplier": 1.0}}}}
        )
    text = str(err.value)
    assert "must exceed the noise multiplier (1)" in text and "set it above 1" in text
    with pytest.raises(PlanError, match="the default: 10 sites / 20"):
        validate_plan({"sites": 10, "privacy": {"dp": {"adaptive_clip": {}}}})


class Runner:
    """Every site sends an update of norm 5: all clipped."""

    def __call__(self, instruction: Instruction, weights: Any) -> SiteAnswer:
        if instruction.kind is InstructionKind.EVALUATE:
            return SiteAnswer(10, {"loss": 1.0}, None)
        return SiteAnswer(10, {"loss": 1.0}, {"w": np.full(4, 2.5)})


def federate(make_federation: Any, plan: PrivacyPlan, rounds: int, **kw: Any) -> Any:
    fed = make_federation(
        {"w": np.zeros(4)},
        privacy=AggregatorPrivacy(plan, per_round=len(SITES), max_samples=100),
        roster=SITES,
        rounds=rounds,
        sites_per_round=len(SITES),
        max_samples=100,
        final_evaluation=False,
        **kw,
    )
    for site in SITES:
        fed.start_site(
            site, Runner(), privacy=SitePrivacy(site, plan, per_round=len(SITES), max_samples=100)
        )
    fed.start()
    return fed


def test_a_federation_with_adaptive_clipping_records_what_dp_accounting_computes(
    make_federation: Any,
) -> None:
    fed = federate(make_federation, adaptive_plan(), rounds=5)
    history = fed.finish()
    count_std = 2.0
    for k, record in enumerate(history, start=1):
        accountant = rdp.RdpAccountant()
        accountant.compose(released(2 / math.sqrt(3) * CLIP, count_std, k))
        assert record.privacy["epsilon"] == pytest.approx(accountant.get_epsilon(DELTA))
        assert record.privacy["accountant"] == "rdp"


# ------------------------------------------------- point 2: the PLD accountant


def test_pld_gives_the_exact_gaussian_composition() -> None:
    exact = dpmath.epsilon([1.0] * 20, DELTA, Accountant.PLD)
    assert exact == pytest.approx(28.37, abs=0.005)
    pld = PLDAccountant()
    pld.compose(dp_event.GaussianDpEvent(1.0), 20)
    assert exact == pytest.approx(pld.get_epsilon(DELTA), rel=1e-6)
    assert (
        exact < dpmath.epsilon([1.0] * 20, DELTA, Accountant.RDP) == pytest.approx(30.13, abs=5e-3)
    )
    # rounds of different noise (distributed noise after dropouts) compose exactly too
    mixed = [1.0, 1.0, 0.7, 2.0]
    pld = PLDAccountant()
    pld.compose(dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(z) for z in mixed]))
    assert dpmath.epsilon(mixed, DELTA, Accountant.PLD) == pytest.approx(
        pld.get_epsilon(DELTA), rel=1e-5
    )
    assert dpmath.epsilon([], DELTA, Accountant.PLD) == 0.0
    assert dpmath.epsilon([0.0], DELTA, Accountant.PLD) == math.inf


def test_with_pld_a_federation_reports_28_37_after_20_rounds(make_federation: Any) -> None:
    plan = PrivacyPlan(dp=DPPlan(noise_multiplier=1.0, clip=CLIP), accountant=Accountant.PLD)
    fed = federate(make_federation, plan, rounds=20)
    history = fed.finish()
    assert [r.privacy["accountant"] for r in history] == ["pld"] * 20
    assert history[-1].privacy["epsilon"] == pytest.approx(28.37, abs=0.005)
    live = fed.aggregator.snapshot()["privacy"]  # what `fedloom status` shows
    assert live["accountant"] == "pld" and live["epsilon"] == history[-1].privacy["epsilon"]


def test_the_budget_stop_uses_the_accountant_in_force(make_federation: Any) -> None:
    # epsilon after 5 rounds at z = 1: RDP 12.30, PLD 11.48; a budget of 12 fits 4 or 5
    trained = {}
    for accountant in Accountant:
        plan = PrivacyPlan(
            dp=DPPlan(noise_multiplier=1.0, clip=CLIP, epsilon_budget=12.0),
            accountant=accountant,
        )
        fed = federate(make_federation, plan, rounds=7)
        trained[accountant] = len(fed.finish())
        reason = fed.aggregator.stopped_early
        assert reason is not None and f"{accountant.value.upper()} accountant" in reason
    assert trained == {Accountant.RDP: 4, Accountant.PLD: 5}


def test_the_sites_own_count_uses_the_accountant_in_force(tmp_path: Path) -> None:
    def budget(accountant: Accountant) -> SiteBudget:
        return SiteBudget(
            tmp_path / f"{accountant.value}.json",
            plan_hash="a" * 64,
            noise_multiplier=1.0,
            delta=DELTA,
            limit=12.0,
            accountant=accountant,
        )

    for accountant, fits in ((Accountant.RDP, 4), (Accountant.PLD, 5)):
        site = budget(accountant)
        for n in range(1, fits + 1):
            assert site.charge(n) == pytest.approx(dpmath.epsilon([1.0] * n, DELTA, accountant))
        with pytest.raises(PolicyError, match=f"{accountant.value.upper()} accountant"):
            site.charge(fits + 1)
        assert site.sent() == fits


def test_dp_sgd_accounts_with_the_plans_accountant() -> None:
    # PLD is exact without sampling: q = 1 is the Gaussian mechanism composed
    full = dp_sgd.epsilon(
        noise_multiplier=1.0, sample_rate=1.0, steps=20, delta=DELTA, accountant=Accountant.PLD
    )
    assert full == pytest.approx(28.37, abs=0.01)
    kw: dict[str, Any] = {"noise_multiplier": 1.1, "sample_rate": 0.08, "steps": 50}
    rdp_eps = dp_sgd.epsilon(**kw, delta=DELTA, accountant=Accountant.RDP)
    pld_eps = dp_sgd.epsilon(**kw, delta=DELTA, accountant=Accountant.PLD)
    assert 0 < pld_eps < rdp_eps
    pld = PLDAccountant()
    pld.compose(dp_event.PoissonSampledDpEvent(0.08, dp_event.GaussianDpEvent(1.1)), 50)
    assert pld_eps == pytest.approx(pld.get_epsilon(DELTA), rel=1e-9)
    settings = TrainSettings(epochs=1, batch_size=32, lr=0.05)
    for accountant, want in ((Accountant.RDP, rdp_eps), (Accountant.PLD, pld_eps)):
        dp = DPSGDSettings(1.1, 1.0, DELTA, accountant)
        # 400 records, batches of 32: q = 0.08, 13 steps a round; 50 steps ~ 4 rounds
        eps = dp_sgd.site_epsilon(dp, settings, num_samples=400, rounds=4)
        assert eps == pytest.approx(
            dp_sgd.epsilon(**{**kw, "steps": 52}, delta=DELTA, accountant=accountant)
        )
        assert eps > want  # two steps more
    plan = validate_plan({"sites": 3, "privacy": {"dp_sgd": {}, "accountant": "pld"}})
    settings_of_site, _ = dp_sgd_of(plan, "site-01", 1)
    assert settings_of_site is not None and settings_of_site.accountant is Accountant.PLD


# --------------------------------------------------------------- the plan option


def test_the_accountant_is_a_plan_option_that_keeps_old_plan_hashes(tmp_path: Path) -> None:
    base = {"sites": 3, "privacy": {"dp": {"noise_multiplier": 1.0}}}
    plain = validate_plan(base)
    assert plain.privacy.accountant is Accountant.RDP  # the default
    explicit = validate_plan({"sites": 3, "privacy": {**base["privacy"], "accountant": "rdp"}})
    pld = validate_plan({"sites": 3, "privacy": {**base["privacy"], "accountant": "pld"}})
    assert pld.privacy.accountant is Accountant.PLD
    (tmp_path / "task.py").write_text("")
    assert plan_hash(plain, tmp_path) == plan_hash(explicit, tmp_path) != plan_hash(pld, tmp_path)
    # the default is left out of the hashed JSON: a plan approved before the option
    # existed keeps its hash (this one was computed before it existed)
    assert "accountant" not in plain.canonical_json()
    assert plan_hash(plain, tmp_path) == (
        "fc0a3e49c524e86650c1aedc56492251f503f59f6ff72ce1789c3e78102281de"
    )
    with pytest.raises(PlanError) as err:
        validate_plan({"sites": 3, "privacy": {"accountant": "gdp"}})
    assert "privacy.accountant" in str(err.value) and "'pld'" in str(err.value)


@pytest.mark.process
@pytest.mark.slow
def test_a_simulation_with_pld_names_the_accountant_in_summary_and_metrics(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    out = run_cli(
        "simulate", str(ws), "--sites", "3", "--rounds", "20", "--run-name", "pld",
        "privacy.dp.noise_multiplier=1.0", "privacy.dp.clip=0.5", "privacy.accountant=pld",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "28.3735 at delta 1e-05 (PLD accountant)" in out.stdout
    run = ws / "runs" / "pld"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(28.37, abs=0.005)
    assert summary["accountant"] == "pld" and summary["delta"] == DELTA
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(r["accountant"] == "pld" for r in train)


def test_status_and_the_progress_line_name_the_accountant(
    tmp_path: Path, make_federation: Any
) -> None:
    plan = PrivacyPlan(dp=DPPlan(noise_multiplier=1.0, clip=CLIP), accountant=Accountant.PLD)
    fed = federate(make_federation, plan, rounds=2)
    history = fed.finish()
    # `fedloom status` reads what the serving aggregator published (real SQLite store)
    state_dir = tmp_path / "ws" / "aggregator"
    state_dir.mkdir(parents=True)
    store = RunStore(state_dir)
    plan_json = Plan(name="pld", sites=list(SITES), rounds=2).model_dump(mode="json")
    run = store.new_run("run-1", tmp_path / "ws" / "runs" / "run-1", "hash", json.dumps(plan_json))
    lock = lock_state(state_dir)  # this process is the aggregator
    try:
        store.write_live(run, fed.aggregator.snapshot())
        out = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(
            app, ["status", str(tmp_path / "ws")]
        )
    finally:
        lock.close()
        store.close()
    assert out.exit_code == 0, out.output
    eps = dpmath.epsilon([1.0, 1.0], DELTA, Accountant.PLD)
    assert f"privacy: epsilon {eps:.3g} at delta 1e-05 (PLD accountant) after 2 round(s)" in (
        out.stdout
    )
    # the progress line after a training round
    console = Console(file=io.StringIO(), width=200)
    with RoundProgress(console, 2) as progress:
        progress(RoundClosed(history[0]), TrafficCounter())
    first = dpmath.epsilon([1.0], DELTA, Accountant.PLD)
    assert f"ε {first:.3g} PLD" in console.file.getvalue()
