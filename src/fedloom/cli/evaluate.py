"""``fedloom evaluate WORKSPACE --model FILE``: a given model evaluated at every site,
no training, in simulation or over gRPC with real collaborators (docs/cli/evaluate.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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

if TYPE_CHECKING:
    from fedloom.report import RunRecorder
    from fedloom.results import SimulationResult

ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="The model to evaluate: a safetensors file, a run folder (its "
        "final.safetensors) or an aggregator checkpoint (round-NNNN.safetensors).",
        show_default=False,
    ),
]
MatrixOption = Annotated[
    Path | None,
    typer.Option(
        "--matrix",
        help="Instead of --model: a simulated run's folder whose sites kept a personal "
        "model (training.personal); each is evaluated at every site (site x site table, "
        "heat map, in that run's folder).",
        show_default=False,
    ),
]


@friendly
def evaluate(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    model: ModelOption = None,
    matrix: MatrixOption = None,
    transport: TransportOption = Transport.INPROCESS,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="Workers for the sites' evaluation (0: in process)."),
    ] = None,
    run_name: RunNameOption = None,
    runs_dir: RunsDirOption = None,
    quiet: QuietOption = False,
) -> None:
    """Evaluate a given model at every site of the plan, with no training: each site's
    metrics on its own validation data, their sample-weighted mean and, where the task
    has one, the test set's.

    Writes runs/<run-name>/ as `fedloom simulate` does, with "evaluation" in
    summary.json. A deployed aggregator does the same with `fedloom aggregator start
    --evaluate FILE`.
    """
    from fedloom.cli.results import fresh_run_dir, print_results, simulate_recorded
    from fedloom.core.errors import PlanError
    from fedloom.plan import load_plan, plan_hash
    from fedloom.report import RunRecorder
    from fedloom.simulation.options import SimulationOptions
    from fedloom.store.model_file import load_model

    if (model is None) == (matrix is None):
        raise PlanError(["give --model FILE or --matrix RUN (one of them)"], source="command line")
    if matrix is not None:
        if transport is Transport.GRPC:
            raise PlanError(
                [
                    "--matrix: only in simulation (over gRPC it would send one site's "
                    "locally trained model to the other sites)"
                ],
                source="command line",
            )
        cross_site_matrix(workspace, list(overrides or []), matrix, workers, quiet)
        return
    assert model is not None  # noqa: S101 - one of the two, checked above
    weights = load_model(model)  # a missing or unreadable file is said before anything runs
    if transport is Transport.GRPC:
        if workers is not None:
            raise PlanError(["--workers: only with --transport inprocess"], source="command line")
        from fedloom.deployment.launcher import run_local_grpc

        code = run_local_grpc(
            workspace,
            list(overrides or []),
            run_name=run_name,
            runs_dir=runs_dir,
            quiet=quiet,
            evaluate=model,
        )
        raise typer.Exit(code)
    plan = load_plan(workspace, list(overrides or []))
    digest = plan_hash(plan, workspace)
    console.print(
        f"[bold]{plan.name}[/]: evaluating {model} at {count(len(plan.roster), 'site')}, "
        "no training"
    )
    console.print(f"plan hash [cyan]{digest}[/]")
    recorder = RunRecorder(fresh_run_dir(workspace, run_name, runs_dir), plan=plan)
    options = SimulationOptions(
        workers=workers, model=weights, state_root=recorder.run_dir / "sites"
    )
    result = simulate_recorded(
        workspace, plan, digest, options, recorder, quiet=quiet, done=plan.rounds
    )
    print_results(recorder, result)
    record_evaluation(recorder, result, model)


def evaluation(result: SimulationResult, model: Path) -> dict[str, Any]:
    """The evaluation round's figures: each site's, and their sample-weighted mean."""
    from fedloom.core.records import InstructionKind

    rounds = [r for r in result.history if r.kind is InstructionKind.EVALUATE]
    last = rounds[-1] if rounds else None
    sites = (
        {}
        if last is None
        else {r.site: {"num_samples": r.num_samples, **r.metrics} for r in last.results}
    )
    return {
        "model": str(model),
        "sites": sites,
        "samples": sum(int(s["num_samples"]) for s in sites.values()),
        "weighted_mean": {} if last is None else last.metrics,
        "failed": [] if last is None else sorted(f.site for f in last.failures),
        "test": dict(result.test_metrics),
    }


def record_evaluation(recorder: RunRecorder, result: SimulationResult, model: Path) -> None:
    """Add the evaluation to the run's summary.json and print it."""
    from fedloom.core.files import write_atomic

    figures = evaluation(result, model)
    summary = {**(recorder.finished or {}), "evaluation": figures}
    path = recorder.run_dir / "summary.json"
    write_atomic(path, (json.dumps(summary, indent=2) + "\n").encode())
    names = sorted({k for s in figures["sites"].values() for k in s if not k.endswith("_samples")})
    table = Table("site", "samples", *names, title=f"{model} at each site")
    for site, row in sorted(figures["sites"].items()):
        table.add_row(
            site, str(row["num_samples"]), *(f"{row.get(n, float('nan')):.4f}" for n in names)
        )
    mean = figures["weighted_mean"]
    table.add_row(
        "[bold]weighted mean[/]",
        str(figures["samples"]),
        *(f"[bold]{mean[n]:.4f}[/]" if n in mean else "-" for n in names),
    )
    console.print(table)
    if figures["failed"]:
        console.print(f"not evaluated (the site failed): {', '.join(figures['failed'])}")


def cross_site_matrix(
    workspace: Path, overrides: list[str], run_dir: Path, workers: int | None, quiet: bool
) -> None:
    """Evaluate each site's personal model of ``run_dir`` at every site; write the
    matrix into that run's summary.json ("cross_site") and cross_site.png, print it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from fedloom.core.errors import WorkspaceError
    from fedloom.core.files import write_atomic
    from fedloom.plan import load_plan, plan_hash
    from fedloom.plots import plot_matrix
    from fedloom.simulation.crosseval import cross_site
    from fedloom.simulation.options import SimulationOptions

    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise WorkspaceError(f"{run_dir} is not a run folder: it has no summary.json")
    plan = load_plan(workspace, overrides)
    summary = json.loads(summary_file.read_text())
    ran = summary.get("plan_hash")
    if ran != plan_hash(plan, workspace):
        raise WorkspaceError(
            f"{run_dir} ran another plan (hash {str(ran)[:16]}…) than this workspace's "
            "with these overrides: its sites' models would meet other data",
            hint="give the overrides that run was given (its plan.json has its plan)",
        )
    console.print(
        f"[bold]{plan.name}[/]: the local model of each of {count(len(plan.roster), 'site')} "
        f"from {run_dir}, evaluated at every site"
    )
    with Progress(
        TextColumn("models"), BarColumn(), MofNCompleteColumn(), console=console, disable=quiet
    ) as bar:
        job = bar.add_task("", total=len(plan.roster))
        found = cross_site(
            workspace,
            plan,
            run_dir,
            SimulationOptions(workers=workers),
            on_row=lambda site: bar.update(job, advance=1),
        )
    data = found.to_json()
    summary["cross_site"] = data
    write_atomic(summary_file, (json.dumps(summary, indent=2) + "\n").encode())
    plot_matrix(data["values"], data["sites"], run_dir / "cross_site.png", found.metric)
    table = Table("model of", *found.sites, title=f"Cross-site {found.metric}")
    for site, row in zip(found.sites, found.values, strict=True):
        cells = [
            f"[bold]{v:.4f}[/]" if s == site else f"{v:.4f}"
            for s, v in zip(found.sites, row, strict=True)
        ]
        table.add_row(site, *cells)
    console.print(table)
    console.print(
        f"diagonal (each model at its own site) {found.diagonal_mean:.4f}, off-diagonal "
        f"{found.off_diagonal_mean:.4f}; in {summary_file} and {run_dir / 'cross_site.png'}",
        highlight=False,
    )
