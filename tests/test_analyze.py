"""Federated statistics (``fedloom analyze``): four sites' CSV tables give the pooled
data's counts, means, variances and histograms exactly; a cell a site holds fewer than
``min_count`` records of comes back suppressed, never as 0; the site policy refuses a
column or statistic it does not allow, naming the rule; under secure aggregation what
the aggregator receives is masked and the unmasked sum is still the pooled figures;
under DP the noise is one Gaussian mechanism of the plan's multiplier, charged to the
site's own count. Real processes for the command line, the real round loop and real
X25519 masks in process for the captured inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from observed import Observed
from scipy import stats
from workspaces import run_cli

from fedloom.analysis import AnalysisPlan, StatisticsTask, analysis_results, totals
from fedloom.analysis.sums import noise_scales, site_release
from fedloom.analysis.table import read_table
from fedloom.core.errors import PolicyError, TaskError
from fedloom.core.records import Instruction, SiteAnswer, TrainSettings
from fedloom.core.weights import Weights
from fedloom.privacy.accounting import combined_multiplier
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.quantize import encode
from fedloom.privacy.settings import PrivacyPlan, SecureAggregationPlan
from fedloom.privacy.site import SitePrivacy
from fedloom.runtime.executor import execute
from fedloom.tasks.base import SiteContext
from fedloom.transport import InProcessTransport

SITES = ("site-01", "site-02", "site-03", "site-04")
ROWS = {"site-01": 150, "site-02": 90, "site-03": 240, "site-04": 60}
EDGES = [0, 30, 45, 60, 75, 90, 120]
STATISTICS = [
    {"stat": "count"},
    {"stat": "mean", "column": "age"},
    {"stat": "variance", "column": "age"},
    {"stat": "sum", "column": "bmi"},
    {"stat": "histogram", "column": "age", "bins": EDGES},
    {"stat": "quantiles", "column": "age", "range": [0, 120], "q": [0.5], "resolution": 1200},
]


def write_tables(data: Path) -> None:
    """Each site's patients.csv: age and bmi, a few bmi values missing, and site-04 with
    only a handful of patients over 90 (a cell under a min_count of 5)."""
    rng = np.random.default_rng(7)
    for i, site in enumerate(SITES):
        n = ROWS[site]
        age = np.round(rng.normal(45 + 6 * i, 14, n).clip(18, 89.9), 1)
        if site == "site-04":
            age[:3] = [91.0, 95.5, 99.0]
        bmi = np.round(rng.normal(27, 5, n), 1)
        (data / site).mkdir(parents=True)
        with (data / site / "patients.csv").open("w", newline="") as out:
            rows = csv.writer(out)
            rows.writerow(["age", "bmi", "income"])
            for a, b in zip(age, bmi, strict=True):
                rows.writerow([a, "" if rng.random() < 0.05 else b, 1000])


def workspace(root: Path, *, min_count: int) -> Path:
    ws = root / "cohort"
    write_tables(ws / "data")
    plan = {
        "version": 1,
        "name": "cohort",
        "sites": len(SITES),
        "data": {"dataset": "custom", "path": "data"},
        "analysis": {"table": "patients.csv", "min_count": min_count, "statistics": STATISTICS},
    }
    (ws / "federation.yaml").write_text(json.dumps(plan) + "\n")
    return ws


def tables(ws: Path) -> dict[str, dict[str, np.ndarray]]:
    return {s: read_table(ws / "data" / s / "patients.csv") for s in SITES}


def pooled(ws: Path) -> dict[str, np.ndarray]:
    parts = tables(ws).values()
    return {c: np.concatenate([t[c] for t in parts]) for c in ("age", "bmi")}


def by_name(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["statistic"]: row for row in figures["statistics"]}


def assert_pooled(figures: dict[str, Any], ws: Path, min_count: int) -> None:
    """The statistics equal the pooled data's; a bin is suppressed exactly where some
    site holds between 1 and min_count - 1 of its records."""
    data, rows = pooled(ws), by_name(figures)
    age, bmi = data["age"], data["bmi"][~np.isnan(data["bmi"])]
    assert rows["count"]["value"] == sum(ROWS.values())
    assert rows["mean(age)"]["value"] == pytest.approx(age.mean(), rel=1e-12)
    assert rows["variance(age)"]["value"] == pytest.approx(age.var(ddof=1), rel=1e-9)
    assert rows["sum(bmi)"] == {**rows["sum(bmi)"], "n": len(bmi)}
    assert rows["sum(bmi)"]["value"] == pytest.approx(bmi.sum(), rel=1e-12)
    per_site = [np.histogram(t["age"], EDGES)[0] for t in tables(ws).values()]
    small = [sum(1 for c in counts if 0 < c < min_count) for counts in zip(*per_site, strict=True)]
    hist = rows["histogram(age)"]
    whole = np.histogram(age, EDGES)[0]
    for i, withheld in enumerate(small):
        if withheld:
            assert hist["counts"][i] is None
            assert hist["suppressed"][i] == (
                f"suppressed: fewer than {min_count} records at {withheld} site(s)"
            )
        else:
            assert hist["counts"][i] == whole[i] and hist["suppressed"][i] is None
    (median,) = rows["quantiles(age)"]["value"]
    assert abs(median - np.median(age)) <= 2 * rows["quantiles(age)"]["resolution"]


@pytest.mark.process
def test_four_sites_give_the_pooled_figures_and_a_small_bin_comes_back_suppressed(
    tmp_path: Path,
) -> None:
    ws = workspace(tmp_path, min_count=5)
    done = run_cli("analyze", str(ws), "--json", "--run-name", "cohort")
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout)
    assert figures == json.loads((ws / "runs" / "cohort" / "summary.json").read_text())["analysis"]
    assert figures["sites"] == 4 and figures["min_count"] == 5
    assert_pooled(figures, ws, 5)
    hist = by_name(figures)["histogram(age)"]
    assert hist["counts"][-1] is None  # site-04's 3 patients over 90
    assert hist["suppressed"][-1] == "suppressed: fewer than 5 records at 1 site(s)"
    assert sum(c is not None for c in hist["counts"]) >= 3  # the test can fail both ways

    table = run_cli("analyze", str(ws), "--run-name", "shown")
    assert table.returncode == 0, table.stderr
    assert "histogram(age) [90, 120)" in table.stdout
    assert "suppressed: fewer than 5 records at 1 site(s)" in table.stdout


POLICY = """\
version: 1
analysis:
  columns: [age]
  statistics: [count, mean, variance, histogram, quantiles]
  min_count: 5
"""


@pytest.mark.process
def test_a_column_or_statistic_the_policy_does_not_allow_is_refused_at_the_site(
    tmp_path: Path,
) -> None:
    ws = workspace(tmp_path, min_count=5)
    policy = ws / "sites" / "site-01" / "policy.yaml"
    site = ("--name", "site-01")
    # `policy init` mirrors the plan's analysis: the data owner starts from what it asks
    assert run_cli("policy", "init", str(ws), *site).returncode == 0
    assert "analysis:\n  columns: [age, bmi]" in policy.read_text()
    assert run_cli("policy", "check", str(ws), *site).returncode == 0
    policy.write_text(POLICY)
    check = run_cli("policy", "check", str(ws), *site)
    assert check.returncode == 12, check.stdout + check.stderr
    assert "breaks 2 rules" in check.stderr
    assert "analysis.columns: the plan's sum(bmi) reads column 'bmi', which may not leave" in (
        check.stderr
    )
    assert "analysis.statistics: the plan asks for sum(bmi): this site releases no sum" in (
        check.stderr
    )
    start = run_cli("collaborator", "start", str(ws), *site, "--aggregator", "localhost:1")
    assert start.returncode == 12, start.stdout + start.stderr
    assert "analysis.columns" in start.stderr and "reads none of its data" in start.stderr
    allowed = run_cli("policy", "check", str(ws), *site, "analysis.min_count=5")
    assert allowed.returncode == 12  # the same plan: overrides do not drop a statistic
    policy.write_text(
        POLICY.replace("[age]", "[age, bmi]").replace("quantiles]", "quantiles, sum]")
    )
    assert run_cli("policy", "check", str(ws), *site).returncode == 0
    policy.write_text(POLICY.replace("min_count: 5", "min_count: 20"))
    low = run_cli("policy", "check", str(ws), *site)
    assert "analysis.min_count: the plan's analysis.min_count is 5, the policy demands" in (
        low.stderr
    )


def test_under_secure_aggregation_the_aggregator_sees_masked_blocks_and_the_pooled_sum(
    tmp_path: Path, make_federation: Any
) -> None:
    ws = workspace(tmp_path, min_count=5)
    query = AnalysisPlan.model_validate(
        {"table": "patients.csv", "min_count": 5, "statistics": STATISTICS}
    )
    task = StatisticsTask(query, plan_hash="0" * 64, clip_range=1e6)
    plan = PrivacyPlan(secure_aggregation=SecureAggregationPlan(bits=64, clip_range=1e6))
    observed: list[Observed] = []

    def transport(aggregator: Any) -> InProcessTransport:
        observed.append(Observed(aggregator))
        return InProcessTransport(observed[0], roundtrip=True)

    privacy = AggregatorPrivacy(plan, per_round=len(SITES), max_samples=1)
    fed = make_federation(
        task.init_weights(0),
        transport=transport,
        privacy=privacy,
        roster=SITES,
        rounds=1,
        sites_per_round=len(SITES),
        max_samples=1,
    )
    data = {s: task.load_data(context(ws, s)) for s in SITES}
    releases = {s: site_release(tables(ws)[s], query, s)[0] for s in SITES}

    def runner(site: str) -> Any:
        def run(instruction: Instruction, weights: Weights) -> SiteAnswer:
            index = SITES.index(site)
            return execute(task, instruction, weights, data[site], site=site, index=index,
                           plan_seed=0)  # fmt: skip

        return run

    for site in SITES:
        fed.start_site(
            site,
            runner(site),
            privacy=SitePrivacy(site, plan, per_round=len(SITES), max_samples=1),
        )
    fed.start()
    fed.finish()

    frac = plan.fractional_bits(len(SITES), 1)
    for site in SITES:
        seen = np.frombuffer(b"".join(observed[0].uploads[(site, 1)]), dtype=np.uint64)
        clear = np.concatenate(
            [
                encode(a, weight=1, clip_range=1e6, frac=frac, bits=64)
                for a in releases[site].values()
            ]
        )
        assert seen.size == clear.size > 1000
        assert np.count_nonzero(seen == clear) < 5  # only a chance equality
        top = (seen >> np.uint64(56)).astype(np.int64)
        assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-4  # uniform
        clear_top = (clear >> np.uint64(56)).astype(np.int64)
        assert stats.chisquare(np.bincount(clear_top, minlength=256)).pvalue < 1e-12
    summed = totals(fed.aggregator.weights, len(SITES))
    assert_pooled(analysis_results(query, summed, len(SITES), None), ws, 5)


def context(ws: Path, site: str, state: Path | None = None) -> SiteContext:
    return SiteContext(site, SITES.index(site), 1, 0, data_path=ws / "data" / site, state_dir=state)


def test_dp_noise_is_one_gaussian_mechanism_charged_to_the_sites_own_count(
    tmp_path: Path,
) -> None:
    ws = workspace(tmp_path, min_count=1)
    dp = {"noise_multiplier": 2.0, "delta": 1e-5, "epsilon_budget": 4.0}
    stats_ = [*STATISTICS[:2], {"stat": "mean", "column": "bmi", "range": [10, 50]}]
    with pytest.raises(ValueError, match=r"under dp, mean\(age\) need range"):
        AnalysisPlan.model_validate({"table": "patients.csv", "statistics": stats_, "dp": dp})
    stats_[1] = {"stat": "mean", "column": "age", "range": [0, 120]}
    query = AnalysisPlan.model_validate(
        {"table": "patients.csv", "min_count": 1, "statistics": stats_, "dp": dp}
    )
    # parts: count | n, sum of age (half range 60) | n, sum of bmi (half range 20)
    scales = noise_scales(query)
    root = 2 * 5**0.5
    assert np.concatenate(scales) == pytest.approx([root, root, root * 60, root, root * 20])
    per_part = [float(s[i] / d) for s, st in zip(scales, query.statistics, strict=True)
                for i, d in enumerate(st.sensitivities())]  # fmt: skip
    assert combined_multiplier(per_part) == pytest.approx(2.0)

    task = StatisticsTask(query, plan_hash="a" * 64)
    state = tmp_path / "state"
    state.mkdir()
    site_data = task.load_data(context(ws, "site-01"))
    exact = site_release(tables(ws)["site-01"], query, "site-01")[0]
    out = task.train(
        task.init_weights(0), site_data, TrainSettings(), context(ws, "site-01", state)
    )
    assert out.num_samples == 1 and out.metrics["analysis_epsilon"] > 0
    assert not np.allclose(out.weights["stat.00.sums"], exact["stat.00.sums"])
    spent = json.loads((state / "privacy-spent.json").read_text())
    assert spent == {"plans": {"a" * 64: 1}}
    with pytest.raises(PolicyError, match="privacy budget is spent"):
        for _ in range(50):
            task.train(
                task.init_weights(0), site_data, TrainSettings(), context(ws, "site-01", state)
            )


def test_a_value_beyond_secure_aggregations_range_is_refused_not_clipped(tmp_path: Path) -> None:
    ws = workspace(tmp_path, min_count=1)
    query = AnalysisPlan.model_validate(
        {"table": "patients.csv", "min_count": 1, "statistics": STATISTICS}
    )
    task = StatisticsTask(query, plan_hash="0" * 64, clip_range=100.0)
    with pytest.raises(TaskError, match="beyond secure aggregation's clip_range 100"):
        task.train(task.init_weights(0), task.load_data(context(ws, "site-03")), TrainSettings(),
                   context(ws, "site-03"))  # fmt: skip
    bad = tmp_path / "bad.csv"
    bad.write_text("age,bmi\n41,27\nforty,30\n")
    with pytest.raises(TaskError, match=r"line 3, column 'age': 'forty' is not a number"):
        read_table(bad)


@pytest.mark.process
def test_over_grpc_with_secure_aggregation_each_release_is_in_the_sites_audit_log(
    tmp_path: Path,
) -> None:
    """A real aggregator and four collaborators as processes, mutual TLS on loopback."""
    ws = workspace(tmp_path, min_count=5)
    masked = ("privacy.secure_aggregation.bits=64", "privacy.secure_aggregation.clip_range=1e6")
    done = run_cli("analyze", str(ws), *masked, "--transport", "grpc", "--json", "--run-name", "g")
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads((ws / "runs" / "g" / "summary.json").read_text())["analysis"]
    assert_pooled(figures, ws, 5)
    sizes = [s.size for s in AnalysisPlan.model_validate({"statistics": STATISTICS}).statistics]
    for site in SITES:
        lines = (ws / "sites" / site / "audit.jsonl").read_text().splitlines()
        (update,) = [r for r in map(json.loads, lines) if r["kind"] == "update"]
        assert [t["name"] for t in update["tensors"][::2]] == [
            f"stat.{i:02d}.sums" for i in range(len(STATISTICS))
        ]
        assert [t["shape"] for t in update["tensors"][::2]] == [[n] for n in sizes]
        assert update["privacy"]["secure_aggregation"]["bits"] == 64
        assert update["metrics"] == {}  # nothing of the table travels beside the blocks
