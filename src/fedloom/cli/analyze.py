"""``fedloom analyze WORKSPACE``: the plan's federated statistics, in simulation or over
gRPC with real collaborators (docs/cli/analyze.md, docs/analysis.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedloom.cli.common import (
    Overrides,
    QuietOption,
    RunNameOption,
    RunsDirOption,
    Transport,
    TransportOption,
    WorkspaceArg,
    console,
    count,
    friendly,
)


@friendly
def analyze(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    transport: TransportOption = Transport.INPROCESS,
    run_name: RunNameOption = None,
    runs_dir: RunsDirOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the statistics as JSON instead of a table.")
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Compute the plan's federated statistics (its `analysis:` section) over every
    site's table: counts, sums, means, variances, histograms, approximate quantiles,
    min and max. A cell a site holds fewer than analysis.min_count records of comes back
    suppressed; with analysis.dp each site adds Gaussian noise first.

    Writes runs/<run-name>/ with "analysis" in summary.json. A deployed aggregator does
    the same with `fedloom aggregator start` on an analysis plan.
    """
    from fedloom.core.errors import PlanError
    from fedloom.plan import load_plan, plan_hash

    plan = load_plan(workspace, list(overrides or []))
    if plan.analysis is None:
        raise PlanError(
            ["the plan has no analysis: section (the statistics to compute)"],
            source=str(Path(workspace) / "federation.yaml"),
        )
    name = run_name or time.strftime("analysis-%Y%m%d-%H%M%S")
    if not as_json:
        console.print(
            f"[bold]{plan.name}[/]: {count(len(plan.analysis.statistics), 'statistic')} "
            f"at {count(len(plan.roster), 'site')}, min count {plan.analysis.min_count}"
            + (
                f", dp noise multiplier {plan.analysis.dp.noise_multiplier:g}"
                if plan.analysis.dp
                else ""
            )
        )
        console.print(f"plan hash [cyan]{plan_hash(plan, workspace)}[/]")
    if transport is Transport.GRPC:
        from fedloom.deployment.launcher import run_local_grpc

        code = run_local_grpc(
            workspace, list(overrides or []), run_name=name, runs_dir=runs_dir, quiet=True
        )
        if code:
            raise typer.Exit(code)
    else:
        _simulate(workspace, list(overrides or []), name, runs_dir, quiet or as_json)
    run_dir = (runs_dir or Path(workspace) / "runs") / name
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = summary.get("analysis")
    if figures is None:
        raise PlanError([f"{run_dir}: the run released no statistics"], source=str(run_dir))
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        return
    print_analysis(figures)
    console.print(f"Results in [bold]{run_dir}[/] (summary.json: analysis)")


def _simulate(
    workspace: Path, overrides: list[str], name: str, runs_dir: Path | None, quiet: bool
) -> None:
    from fedloom.cli.results import fresh_run_dir, simulate_recorded
    from fedloom.plan import load_plan, plan_hash
    from fedloom.report import RunRecorder
    from fedloom.simulation.options import SimulationOptions

    plan = load_plan(workspace, overrides)
    recorder = RunRecorder(fresh_run_dir(workspace, name, runs_dir), plan=plan)
    options = SimulationOptions(state_root=recorder.run_dir / "sites")
    digest = plan_hash(plan, workspace)
    recorder.finish(simulate_recorded(workspace, plan, digest, options, recorder, quiet=quiet))


def print_analysis(figures: dict[str, Any]) -> None:
    """The statistics as a table: one row a statistic, one a histogram bin."""
    table = Table("statistic", "value", "n", "note", title=f"{figures['sites']} sites")
    for row in figures["statistics"]:
        if row["stat"] == "histogram":
            edges = row["edges"]
            for i, (value, note) in enumerate(zip(row["counts"], row["suppressed"], strict=True)):
                label = f"{row['statistic']} [{edges[i]:g}, {edges[i + 1]:g})"
                table.add_row(label, _shown(value), "", note or "")
            continue
        note = row.get("suppressed") or row.get("note") or ""
        if "resolution" in row and not note:
            note = f"within {row['resolution']:g}"
        value = row.get("value")
        if isinstance(value, list):
            value = ", ".join(f"q{q:g}={v:.4g}" for q, v in zip(row["q"], value, strict=True))
        table.add_row(row["statistic"], _shown(value), _shown(row.get("n")), note)
    console.print(table)
    dp = figures.get("dp")
    if dp is not None:
        console.print(
            f"dp: noise multiplier {dp['noise_multiplier']:g}, epsilon {dp['epsilon']:.4g} "
            f"at delta {dp['delta']:g} (each site's own noise; the sum is noisier)"
        )


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
