"""Contribution scores: what each site's data is worth to the federation, measured in
simulation by training the federation again with coalitions of its sites.

The utility ``v(S)`` of a coalition ``S`` is the final model's primary metric on the
test set when only the sites of ``S`` train, the plan otherwise unchanged (its seed,
rounds and strategy, each site's same data); negated for a metric that improves
downwards (a loss, a perplexity), so that a larger utility is always better. ``v(∅)``
is the initial model's. Every coalition is trained once and its utility kept.

- **Leave-one-out**: ``v(N) - v(N minus i)``: what the federation loses without site
  ``i``. Cheap (one run a site) but blind to sites that stand in for each other.
- **Shapley value** (Shapley, 1953; for data, Ghorbani and Zou, 2019, "Data Shapley";
  for federated sites, Wang et al., 2020, "A Principled Approach to Data Valuation for
  Federated Learning"): the mean of site ``i``'s marginal gain ``v(P ∪ {i}) - v(P)``
  over orderings of the sites, ``P`` the sites before it. It is estimated by Monte-Carlo
  sampling of ``permutations`` orderings (Castro, Gómez and Tejada, 2009); with
  ``truncation > 0`` an ordering stops adding sites once its coalition is within
  ``truncation`` of ``v(N)`` (their gains count 0), as in Data Shapley's TMC.

Both sum to ``v(N) - v(∅)`` over the sites when estimated exactly (the Shapley value
does by construction; its estimate does for each ordering).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Utility = Callable[[frozenset[str]], float]


@dataclass
class CachedUtility:
    """A utility computed at most once per coalition (each one is a federation run)."""

    compute: Utility
    known: dict[frozenset[str], float] = field(default_factory=dict)

    def __call__(self, coalition: frozenset[str]) -> float:
        if coalition not in self.known:
            self.known[coalition] = float(self.compute(coalition))
        return self.known[coalition]


def leave_one_out(utility: Utility, sites: Sequence[str]) -> dict[str, float]:
    """``v(N) - v(N minus i)`` for each site ``i``."""
    everyone = frozenset(sites)
    full = utility(everyone)
    return {s: full - utility(everyone - {s}) for s in sites}


def shapley_monte_carlo(
    utility: Utility,
    sites: Sequence[str],
    permutations: int,
    rng: np.random.Generator,
    truncation: float = 0.0,
) -> dict[str, float]:
    """The Shapley value of each site, estimated from ``permutations`` orderings drawn
    from ``rng`` (see the module; ``truncation`` 0: no truncation)."""
    if permutations < 1:
        raise ValueError("permutations must be at least 1")
    total = {s: 0.0 for s in sites}
    full = utility(frozenset(sites)) if truncation > 0 else math.nan
    for _ in range(permutations):
        order = [sites[i] for i in rng.permutation(len(sites))]
        before: frozenset[str] = frozenset()
        value = utility(before)
        for site in order:
            if truncation > 0 and abs(full - value) <= truncation:
                break  # the rest of this ordering adds nothing measurable
            after = before | {site}
            gained = utility(after)
            total[site] += gained - value
            before, value = after, gained
    return {s: t / permutations for s, t in total.items()}


def shapley_exact(utility: Utility, sites: Sequence[str]) -> dict[str, float]:
    """The Shapley value by its definition, over every coalition (``2^n`` utilities:
    a reference for a few sites)."""
    n = len(sites)
    out = {}
    for site in sites:
        others = [s for s in sites if s != site]
        value = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                before = frozenset(coalition)
                value += weight * (utility(before | {site}) - utility(before))
        out[site] = value
    return out


@dataclass(frozen=True)
class Contributions:
    """Each site's contribution to the final test metric, by the methods asked."""

    metric: str  # the test metric the utility reads (the task's primary)
    higher_is_better: bool
    full: float  # the metric of the whole federation's final model
    empty: float  # ... and of the initial model
    by_method: dict[str, dict[str, float]]  # method -> site -> score (utility units)
    permutations: int = 0
    runs: int = 0  # federations trained for the scores (the whole one not counted)

    def ranking(self) -> list[str]:
        """The sites, most valuable first, by the Shapley value where there is one."""
        method = "shapley" if "shapley" in self.by_method else next(iter(self.by_method))
        scores = self.by_method[method]
        return sorted(scores, key=lambda s: (-scores[s], s))

    def to_json(self) -> dict[str, Any]:
        sites = sorted(next(iter(self.by_method.values())))
        return {
            "metric": f"test_{self.metric}",
            "higher_is_better": self.higher_is_better,
            "full": self.full,
            "empty": self.empty,
            "methods": list(self.by_method),
            "permutations": self.permutations,
            "runs": self.runs,
            "ranking": self.ranking(),
            "sites": {s: {m: scores[s] for m, scores in self.by_method.items()} for s in sites},
        }
