"""Contribution scores of a simulated federation's sites: its coalitions trained with
:func:`~fedloom.simulation.run.simulate`, scored by
:mod:`fedloom.simulation.contributions`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from fedloom.core.errors import TaskError
from fedloom.core.rng import generator
from fedloom.plan import Plan
from fedloom.results import SimulationResult
from fedloom.simulation.contributions import (
    CachedUtility,
    Contributions,
    leave_one_out,
    shapley_monte_carlo,
)
from fedloom.simulation.options import SimulationOptions
from fedloom.simulation.run import simulate

METHODS = ("loo", "shapley")

RunSink = Callable[[frozenset[str], float], None]
"""Hears each coalition trained: its sites and its test metric."""


def coalition_runs(sites: int, methods: Sequence[str], permutations: int) -> int:
    """At most how many federations the scores train (the whole one aside): ``n`` for
    leave-one-out, ``n`` a permutation for Shapley, never more than ``2^n - 2``."""
    runs = (sites if "loo" in methods else 0) + (
        sites * permutations if "shapley" in methods else 0
    )
    return min(runs, (1 << sites) - 2)


def site_contributions(
    workspace: str | Path,
    plan: Plan,
    options: SimulationOptions,
    whole: SimulationResult,
    *,
    methods: Sequence[str] = METHODS,
    permutations: int = 10,
    truncation: float = 0.0,
    on_run: RunSink | None = None,
) -> Contributions:
    """Each site's contribution to ``whole`` (the plan's federation, simulated with
    ``SimulationOptions(test_initial=True)``), by leave-one-out and/or Monte-Carlo
    Shapley; every other coalition is simulated with ``options``."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"contribution methods are {', '.join(METHODS)}; got {list(methods)}")
    declared = whole.metrics
    primary = declared.primary if declared is not None else None
    if primary is None or primary not in whole.test_metrics:
        raise TaskError(
            "contribution scores compare the final model's test metric across coalitions "
            "of sites, and this run has none",
            hint="give the task a test set (a dataset with test_fraction, or load_test_data)",
        )
    if whole.initial_test_metrics is None or primary not in whole.initial_test_metrics:
        raise TaskError("the whole federation must be simulated with test_initial=True")
    assert declared is not None  # noqa: S101 - primary came from it
    higher = declared.better(primary) == "higher"
    sign = 1.0 if higher else -1.0
    sites = list(plan.roster)

    def train(coalition: frozenset[str]) -> float:
        result = simulate(
            workspace,
            plan,
            dataclasses.replace(
                options,
                sites=tuple(s for s in sites if s in coalition),
                baseline=False,
                state_root=None,
                test_initial=False,
            ),
        )
        value = float(result.test_metrics.get(primary, math.nan))
        if not math.isfinite(value):
            raise TaskError(f"the coalition {sorted(coalition)} ended with test_{primary} {value}")
        if on_run is not None:
            on_run(coalition, value)
        return sign * value

    full = float(whole.test_metrics[primary])
    empty = float(whole.initial_test_metrics[primary])
    utility = CachedUtility(train, {frozenset(sites): sign * full, frozenset(): sign * empty})
    by_method: dict[str, dict[str, float]] = {}
    if "loo" in methods:
        by_method["loo"] = leave_one_out(utility, sites)
    if "shapley" in methods:
        rng = generator(plan.seed, 0, "", "contributions")
        by_method["shapley"] = shapley_monte_carlo(utility, sites, permutations, rng, truncation)
    return Contributions(
        metric=primary,
        higher_is_better=higher,
        full=full,
        empty=empty,
        by_method=by_method,
        permutations=permutations if "shapley" in methods else 0,
        runs=len(utility.known) - 2,
    )
