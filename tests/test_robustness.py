"""Robust strategies against misbehaving sites: what Krum and the median buy a user.

10 IID digits sites, 2 of them attackers. Robust strategies stay within 3 points of
clean FedAvg; FedAvg under a scaled attack collapses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from workspaces import make_workspace

from fedloom import SimulationOptions, load_plan, simulate

pytestmark = pytest.mark.slow

SETTINGS = [
    "sites=10",
    "data.partition=iid",
    "rounds=30",
    "training.momentum=0",
    "training.lr=0.2",
    "seed=0",
]
ROBUST = {
    "krum": ["strategy.num_byzantine=2"],
    "multi-krum": ["strategy.num_byzantine=2"],
    "median": [],
}


def _accuracy(ws: Path, strategy: str, extra: list[str], attack: str | None) -> float:
    plan = load_plan(ws, [*SETTINGS, f"strategy.name={strategy}", *extra])
    options = SimulationOptions(workers=0, attack=attack, attackers=2 if attack else 0)
    result = simulate(ws, plan, options)
    assert len(result.attackers) == (2 if attack else 0)
    return result.test_metrics["accuracy"]


def test_robust_strategies_hold_where_fedavg_collapses(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "digits")
    clean = _accuracy(ws, "fedavg", [], None)
    assert clean >= 0.9
    scaled = _accuracy(ws, "fedavg", [], "scale:-4")
    assert clean - scaled >= 0.10, f"FedAvg under scale:-4 lost only {clean - scaled:.3f}"
    for strategy, extra in ROBUST.items():
        for attack in ("sign-flip", "scale:-4"):
            robust = _accuracy(ws, strategy, extra, attack)
            assert robust >= clean - 0.03, f"{strategy} under {attack}: {robust:.4f} vs {clean:.4f}"
