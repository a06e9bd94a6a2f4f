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
    WorkspaceArg,
    console,
    count,
    friendly,
)

if TYPE_CHECKING:
    from fedloom.report import RunRecorder
    from fedloom.results import SimulationResult

ModelOption = Annotated[
    Path,
    typer.Option(
        "--model",
        help="The model to evaluate: a safetensors file, a run folder (its "
        "final.safetensors) or an aggregator checkpoint (round-NNNN.safetensors).",
        show_default=False,
    ),
]


@friendly
def evaluate(
    workspace: WorkspaceArg,
    model: ModelOption,
    overrides: Overrides = None,
    transport: Annotated[
        Transport,
        typer.Option(
            help="inprocess: simulated sites; grpc: an aggregator and a collaborator per "
            "site as real processes with mutual TLS on loopback."
        ),
    ] = Transport.INPROCESS,
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
    from fedloom.cli.results import fresh_run_dir, print_results, showing_run
    from fedloom.core.errors import PlanError
    from fedloom.plan import load_plan, plan_hash
    from fedloom.report import RunRecorder
    from fedloom.simulation.options import SimulationOptions
    from fedloom.simulation.run import simulate
    from fedloom.store.model_file import load_model

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
    try:
        with showing_run(recorder, plan.rounds, quiet=quiet, done=plan.rounds) as hooks:
            result = simulate(
                workspace, plan, options, on_event=hooks.on_event, on_metrics=hooks.on_metrics
            )
    except BaseException as err:
        recorder.fail(plan, digest, err)
        raise
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
