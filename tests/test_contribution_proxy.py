"""The aggregator's per-round contribution proxy (``evaluation.contributions``): each
site's update is compared, as it streams in, with the federation's last step; the
figures are those of a naive computation on the whole updates, the first round has none,
and a federation's label-flipping sites rank last. Secure aggregation and DP, which hide
or noise a single update, refuse it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from workspaces import make_workspace, run_cli

from fedloom import load_plan
from fedloom.core.errors import PlanError
from fedloom.core.records import Instruction, InstructionKind, SiteAnswer
from fedloom.core.weights import Weights

SITES = ("site-a", "site-b", "site-c")
SAMPLES = {"site-a": 10, "site-b": 30, "site-c": 20}


def delta_of(site: str, round: int) -> Weights:
    """Updates that mostly agree, but site-c's points against site-a's."""
    rng = np.random.default_rng([SITES.index(site), round])
    common = np.random.default_rng(99).normal(0, 1, (40, 30)) / round  # one direction
    w = common + rng.normal(0, 0.5, (40, 30))
    if site == "site-c":
        w = -w
    return {"w": w.astype(np.float32), "b": rng.normal(0, 1, 7).astype(np.float64)}


def runner(site: str) -> Any:
    def run(instruction: Instruction, weights: Weights) -> SiteAnswer:
        if instruction.kind is InstructionKind.EVALUATE:
            return SiteAnswer(SAMPLES[site], {}, None)
        return SiteAnswer(SAMPLES[site], {"loss": 1.0}, delta_of(site, instruction.round))

    return run


def flat(weights: Weights) -> np.ndarray:
    return np.concatenate([np.asarray(weights[n], np.float64).reshape(-1) for n in ("w", "b")])


def test_each_update_is_compared_with_the_last_step_as_a_naive_computation_finds(
    make_federation: Any,
) -> None:
    initial = {"w": np.zeros((40, 30), np.float32), "b": np.zeros(7, np.float64)}
    fed = make_federation(initial, roster=SITES, rounds=3, contribution_proxy=True)
    for site in SITES:
        fed.start_site(site, runner(site))
    fed.start()
    history = fed.finish()
    train = [r for r in history if r.kind is InstructionKind.TRAIN]
    assert not any("update_cosine" in r.metrics for r in train[0].results)  # no last step
    total = sum(SAMPLES.values())
    steps = {}
    for rnd in (1, 2):  # FedAvg: the step is the sample-weighted mean, in the model's dtypes
        mean = {
            n: sum(SAMPLES[s] * delta_of(s, rnd)[n].astype(np.float64) for s in SITES) / total
            for n in ("w", "b")
        }
        steps[rnd] = flat({"w": mean["w"].astype(np.float32), "b": mean["b"]})
    for record in train[1:]:
        step = steps[record.round - 1]
        for result in record.results:
            d = flat(delta_of(result.site, record.round))
            want = float(d @ step / (np.linalg.norm(d) * np.linalg.norm(step)))
            assert result.metrics["update_cosine"] == pytest.approx(want, abs=1e-5)
            assert result.metrics["update_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-6)
            assert result.metrics["loss"] == 1.0  # the site's own figures are kept
    cosines = {r.site: r.metrics["update_cosine"] for r in train[2].results}
    assert cosines["site-c"] < 0 < min(cosines["site-a"], cosines["site-b"])


def test_secure_aggregation_or_dp_refuse_the_proxy(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    for privacy in ("privacy.secure_aggregation=true", "privacy.dp.noise_multiplier=1.0"):
        with pytest.raises(PlanError, match="secure aggregation hides from the aggregator"):
            load_plan(ws, ["evaluation.contributions=true", privacy])


@pytest.mark.process
def test_label_flipping_sites_rank_last_in_the_summary_table_and_chart(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    done = run_cli(
        "simulate", str(ws), "sites=6", "rounds=4", "evaluation.contributions=true",
        "--attack", "label-flip", "--attackers", "2", "--run-name", "p", "--workers", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = ws / "runs" / "p"
    summary = json.loads((run_dir / "summary.json").read_text())
    proxy = summary["contribution_proxy"]
    assert sorted(proxy["ranking"][-2:]) == sorted(summary["attackers"])
    assert all(proxy["sites"][s]["rounds"] == 3 for s in proxy["ranking"])  # rounds 2 to 4
    assert "contribution proxy" in done.stdout
    assert (run_dir / "contribution_proxy.png").stat().st_size > 1000
    report = run_cli("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    page = (run_dir / "report.html").read_text()
    assert "<h2>Contribution proxy</h2>" in page
