"""Cross-site evaluation: each site's locally trained model (its Ditto personal model,
kept by a simulated run in ``runs/<run>/sites/<site>/``) evaluated at every site.

Row ``a``, column ``b`` is site ``a``'s model on site ``b``'s validation data. A
model trained for one site's data is expected to do best there: the diagonal against
the rest says how different the sites' data are, and how far a model travels."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.core.errors import TaskError, WorkspaceError
from fedloom.core.records import InstructionKind
from fedloom.plan import Plan
from fedloom.runtime.personal import PERSONAL_FILE
from fedloom.simulation.options import SimulationOptions
from fedloom.simulation.run import simulate
from fedloom.store import load_weights


@dataclass(frozen=True)
class CrossSite:
    metric: str  # the validation metric compared (global_<primary>, as sites report it)
    sites: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]  # [model's site][evaluating site]

    @property
    def diagonal_mean(self) -> float:
        return _mean([self.values[i][i] for i in range(len(self.sites))])

    @property
    def off_diagonal_mean(self) -> float:
        n = len(self.sites)
        return _mean([self.values[i][j] for i in range(n) for j in range(n) if i != j])

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "models": "personal",
            "sites": list(self.sites),
            "values": [list(row) for row in self.values],
            "diagonal_mean": self.diagonal_mean,
            "off_diagonal_mean": self.off_diagonal_mean,
        }


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def local_models(run_dir: Path, sites: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each site's personal model kept by the run in ``run_dir``."""
    found = {s: run_dir / "sites" / s / PERSONAL_FILE for s in sites}
    missing = [s for s, p in found.items() if not p.is_file()]
    if missing:
        raise WorkspaceError(
            f"{run_dir} kept no locally trained model for {', '.join(missing)} "
            f"(looked for sites/<site>/{PERSONAL_FILE})",
            hint="train with a personal model at each site (training.personal, Ditto) "
            "in simulation; then name that run's folder",
        )
    return {s: dict(load_weights(p)) for s, p in found.items()}


def cross_site(
    workspace: Path,
    plan: Plan,
    run_dir: Path,
    options: SimulationOptions,
    *,
    on_row: Callable[[str], None] | None = None,
) -> CrossSite:
    """Evaluate every site's local model at every site (one evaluation-only federation
    per model) and return the matrix of the primary validation metric."""
    sites = tuple(plan.roster)
    models = local_models(run_dir, sites)
    rows: list[tuple[float, ...]] = []
    metric = ""
    for owner in sites:
        result = simulate(
            workspace,
            plan,
            dataclasses.replace(options, model=models[owner], state_root=None),
        )
        declared = result.metrics
        if declared is None or declared.primary is None:
            raise TaskError("the task declares no primary metric to compare across sites")
        metric = f"global_{declared.primary}"
        evaluation = [r for r in result.history if r.kind is InstructionKind.EVALUATE][-1]
        by_site = {r.site: float(r.metrics.get(metric, math.nan)) for r in evaluation.results}
        rows.append(tuple(by_site.get(s, math.nan) for s in sites))
        if on_row is not None:
            on_row(owner)
    return CrossSite(metric, sites, tuple(rows))
