"""What a run leaves behind in ``runs/<run-name>/``.

``metrics.jsonl`` (one line per site per round), ``summary.json``,
``final.safetensors`` (the final global model), ``plan.json`` (the validated plan)
and ``accuracy.png`` (each site's accuracy of the global model, round by round).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedloom.orchestration import RoundRecord
from fedloom.records import InstructionKind
from fedloom.runtime.simulation import SimulationResult
from fedloom.store import save_weights


def metric_rows(history: tuple[RoundRecord, ...]) -> Iterator[dict[str, Any]]:
    """One row per site per round: its metrics, or why it failed."""
    for record in history:
        base = {
            "round": record.round,
            "kind": record.kind.value,
            "attempt": record.attempt,
            "close_reason": record.close_reason.value,
        }
        for r in record.results:
            yield {
                **base,
                "site": r.site,
                "status": "ok",
                "num_samples": r.num_samples,
                "claimed_samples": r.claimed_samples,
                **dict(r.metrics),
            }
        for f in record.failures:
            yield {**base, "site": f.site, "status": f.kind.value, "reason": f.reason}


def final_site_metrics(history: tuple[RoundRecord, ...]) -> dict[str, dict[str, float]]:
    """Each site's metrics of the final global model (the final evaluation round)."""
    evaluations = [r for r in history if r.kind is InstructionKind.EVALUATE]
    if not evaluations:
        return {}
    return {r.site: dict(r.metrics) for r in evaluations[-1].results}


def summary(result: SimulationResult, run_name: str) -> dict[str, Any]:
    sites = final_site_metrics(result.history)
    accs = [m["global_accuracy"] for m in sites.values() if "global_accuracy" in m]
    train_rounds = [r for r in result.history if r.kind is InstructionKind.TRAIN]
    central = result.centralized_metrics
    return {
        "run_name": run_name,
        "plan_name": result.plan.name,
        "rounds": result.plan.rounds,
        "sites": len(result.plan.roster),
        "strategy": result.plan.strategy.name,
        "plan_hash": result.plan_hash,
        "test_accuracy": _num(result.test_metrics.get("accuracy")),
        "test_loss": _num(result.test_metrics.get("loss")),
        "mean_site_accuracy": _num(sum(accs) / len(accs)) if accs else None,
        "worst_site_accuracy": _num(min(accs)) if accs else None,
        "centralized_accuracy": _num(central.get("accuracy")) if central else None,
        "wall_seconds": result.wall_seconds,
        "seconds_per_round": result.wall_seconds / max(1, len(train_rounds)),
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        "attackers": list(result.attackers),
        "failures": sum(len(r.failures) for r in result.history),
        "close_reasons": {str(r.round): r.close_reason.value for r in result.history},
    }


def write_run(result: SimulationResult, run_dir: Path, *, plot: bool = True) -> dict[str, Any]:
    """Write every artefact of ``result`` into ``run_dir``; return the summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for row in metric_rows(result.history):
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    data = summary(result, run_dir.name)
    (run_dir / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    (run_dir / "plan.json").write_text(
        json.dumps(result.plan.model_dump(mode="json"), indent=2) + "\n"
    )
    save_weights(run_dir / "final.safetensors", result.final_weights)
    if plot:
        from fedloom.plots import plot_accuracy

        plot_accuracy(result.history, run_dir / "accuracy.png", test=data["test_accuracy"])
    return data


def _num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)
