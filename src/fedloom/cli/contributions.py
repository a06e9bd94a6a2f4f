"""``fedloom contributions``: what each site's data is worth to the federation, scored
in simulation by training coalitions of its sites (docs/contributions.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedloom.cli.common import (
    Overrides,
    QuietOption,
    RunNameOption,
    RunsDirOption,
    WorkspaceArg,
    console,
    count,
    friendly,
)


@friendly
def contributions(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    method: Annotated[
        str,
        typer.Option(help="loo, shapley, or both separated by a comma."),
    ] = "loo,shapley",
    permutations: Annotated[
        int, typer.Option(min=1, max=10_000, help="Orderings sampled for the Shapley value.")
    ] = 10,
    truncation: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Stop an ordering once its coalition is this close to the whole "
            "federation's test metric (0: never).",
        ),
    ] = 0.0,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="Workers for each federation's local work (0: in process)."),
    ] = None,
    run_name: RunNameOption = None,
    runs_dir: RunsDirOption = None,
    quiet: QuietOption = False,
) -> None:
    """Score each site's contribution to the final model's test metric: the whole
    federation is simulated, then the coalitions that leave-one-out and a Monte-Carlo
    Shapley estimate need (each with the same plan, seed and site data).

    Writes runs/<run-name>/ as `fedloom simulate` does, with the scores in
    summary.json ("contributions") and contributions.png.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from fedloom.cli.results import fresh_run_dir, print_results, showing_run
    from fedloom.core.files import write_atomic
    from fedloom.plan import load_plan
    from fedloom.plots import plot_contributions
    from fedloom.report import RunRecorder
    from fedloom.simulation.options import SimulationOptions
    from fedloom.simulation.run import simulate
    from fedloom.simulation.valuation import METHODS, coalition_runs, site_contributions

    methods = [m.strip() for m in method.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        raise typer.BadParameter(
            f"choose from {', '.join(METHODS)}, separated by a comma (got {method!r})",
            param_hint="--method",
        )
    plan = load_plan(workspace, list(overrides or []))
    console.print(
        f"[bold]{plan.name}[/]: contributions of {count(len(plan.roster), 'site')} "
        f"({', '.join(methods)}), {plan.rounds} rounds a federation"
    )
    recorder = RunRecorder(fresh_run_dir(workspace, run_name, runs_dir), plan=plan)
    run_dir = recorder.run_dir
    options = SimulationOptions(workers=workers, test_initial=True, state_root=run_dir / "sites")
    with showing_run(recorder, plan.rounds, quiet=quiet) as hooks:
        whole = simulate(
            workspace, plan, options, on_event=hooks.on_event, on_metrics=hooks.on_metrics
        )
    most = coalition_runs(len(plan.roster), methods, permutations)
    with Progress(
        TextColumn("coalitions"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=console,
        disable=quiet,
        transient=True,
    ) as bar:
        job = bar.add_task("", total=most)

        def trained(coalition: frozenset[str], value: float) -> None:
            bar.update(job, advance=1, description=f"last: {len(coalition)} sites, {value:.4f}")

        scores = site_contributions(
            workspace,
            plan,
            SimulationOptions(workers=workers),
            whole,
            methods=methods,
            permutations=permutations,
            truncation=truncation,
            on_run=trained,
        )
    summary = recorder.finish(whole)
    summary["contributions"] = scores.to_json()
    write_atomic(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    plot_contributions(scores.by_method, run_dir / "contributions.png", scores.metric)
    print_results(recorder, whole)
    _print_scores(scores.to_json())
    console.print(
        f"Contributions in [bold]{Path(run_dir) / 'summary.json'}[/] and contributions.png"
    )


def _print_scores(data: dict[str, object]) -> None:
    sites = data["sites"]
    methods = data["methods"]
    assert isinstance(sites, dict) and isinstance(methods, list)  # noqa: S101 - to_json's
    table = Table(
        "rank",
        "site",
        *methods,
        title=f"Contribution to {data['metric']} (whole {data['full']:.4f}, "
        f"initial model {data['empty']:.4f}; {data['runs']} coalitions trained)",
    )
    ranking = data["ranking"]
    assert isinstance(ranking, list)  # noqa: S101
    for rank, site in enumerate(ranking, start=1):
        table.add_row(str(rank), site, *(f"{sites[site][m]:+.4f}" for m in methods))
    console.print(table)
