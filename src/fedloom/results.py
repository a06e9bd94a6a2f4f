"""What a federation run gives back, simulated or deployed: the plan, every round's record,
the final model and its metrics; and what a simulated site's failure says."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedloom.core.records import RoundRecord
from fedloom.core.weights import Weights
from fedloom.plan import Plan
from fedloom.tasks.base import CLASSIFICATION, Metrics


@dataclass(frozen=True)
class SimulationResult:
    plan: Plan
    plan_hash: str
    history: tuple[RoundRecord, ...]
    final_weights: Weights
    test_metrics: dict[str, float]
    centralized_metrics: dict[str, float] | None
    wall_seconds: float
    bytes_sent: int
    bytes_received: int
    attackers: tuple[str, ...]
    stopped_early: str | None = None  # why training ended before the plan's rounds
    # the task's declared metrics (None: unknown, the task not loaded)
    metrics: Metrics | None = CLASSIFICATION
    # the name of the strategy that aggregated when it is not the plan's (simulate's
    # ``strategy`` argument); None: the plan's
    strategy: str | None = None
    # the whole model's bytes, a pretrained base included, when the task says (a LoRA
    # adapter travels, not the model): the summary shows the federated bytes against it
    model_bytes: int | None = None
    # the initial model's test metrics (SimulationOptions.test_initial), else None
    initial_test_metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class SiteFailed:
    """A simulated site's local work failed: the one-line ``reason`` the aggregator
    records, and, when the task's own code raised, its ``traceback`` (else empty)."""

    site: str
    round: int
    attempt_id: str
    reason: str
    traceback: str = ""


def contribution_proxy(history: Iterable[RoundRecord]) -> dict[str, Any] | None:
    """The aggregator's per-round contribution proxy over a run (``evaluation.contributions``,
    aggregator/probe.py): each site's mean ``update_cosine`` over the rounds that had one,
    their number and its mean ``update_norm``, the sites ranked by the mean cosine
    (highest first); None when no round had one."""
    cosines: dict[str, list[float]] = {}
    norms: dict[str, list[float]] = {}
    for record in history:
        if not record.aggregated:
            continue
        for result in record.results:
            if "update_cosine" in result.metrics:
                cosines.setdefault(result.site, []).append(result.metrics["update_cosine"])
                norms.setdefault(result.site, []).append(result.metrics.get("update_norm", 0.0))
    if not cosines:
        return None
    sites = {
        site: {
            "mean_cosine": sum(values) / len(values),
            "mean_norm": sum(norms[site]) / len(norms[site]),
            "rounds": len(values),
        }
        for site, values in sorted(cosines.items())
    }
    ranking = sorted(sites, key=lambda s: (-sites[s]["mean_cosine"], s))
    return {"metric": "update_cosine", "sites": sites, "ranking": ranking}
