"""``fedloom``: federated learning across organisations, from one command line.

Every command prints what it did; every error says what was wrong and what to do,
with an exit code per kind of error (see docs/index.md).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from fedloom.cli.analyze import analyze
from fedloom.cli.audit import audit_app
from fedloom.cli.collaborator import collaborator_app
from fedloom.cli.common import (
    Overrides,
    QuietOption,
    RunNameOption,
    RunsDirOption,
    TrackOption,
    Transport,
    WorkspaceArg,
    console,
    count,
    errors,
    friendly,
    start_tracking,
    warn_dropped_trackers,
)
from fedloom.cli.contributions import contributions
from fedloom.cli.dashboard import dashboard
from fedloom.cli.deploy import aggregator_app, run_log
from fedloom.cli.docs import docs
from fedloom.cli.evaluate import evaluate
from fedloom.cli.pki import pki_app
from fedloom.cli.policy import policy_app
from fedloom.cli.report import report
from fedloom.cli.run_text import attack_line, data_text, starting_line, workers_text
from fedloom.cli.status import status
from fedloom.core.errors import PlanError
from fedloom.templates import TEMPLATES, check_target, create_workspace

# Only what the commands' signatures need is imported here; each command imports the
# rest (pydantic's plan, numpy, cryptography, grpc, torch ...) when it runs, so that
# `fedloom --help` and `fedloom status` start at once (tests/test_cli.py checks).
if TYPE_CHECKING:
    pass

app = typer.Typer(
    name="fedloom",
    help="Federated learning across organisations: the model travels, the data stays.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
plan_app = typer.Typer(help="Inspect a workspace's plan (federation.yaml).", no_args_is_help=True)
app.add_typer(plan_app, name="plan")
app.add_typer(aggregator_app, name="aggregator")
app.add_typer(collaborator_app, name="collaborator")
app.add_typer(pki_app, name="pki")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")


class Backend(enum.Enum):
    PROCESSES = "processes"
    RAY = "ray"


@app.command()
@friendly
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to create the workspace in.")],
    template: Annotated[
        str, typer.Option("--template", "-t", help=f"One of: {', '.join(TEMPLATES)}.")
    ] = "digits",
    force: Annotated[bool, typer.Option(help="Write into a folder that is not empty.")] = False,
) -> None:
    """Create a workspace from a template: federation.yaml plus the task module."""
    from fedloom.templates import prepare as prepare_template

    check_target(directory, force=force, how="--force")
    create_workspace(directory, template, force=force, data=False)
    console.print(f"Created workspace [bold]{directory}[/] from template [bold]{template}[/].")
    wrote = prepare_template(template.replace("_", "-"), directory)  # its data, if any
    if wrote:
        console.print(escape(wrote))
    command = "simulate" if (directory / "task.py").exists() else "analyze"  # cohort: none
    console.print(f"Next: [cyan]fedloom {command} {directory}[/]")


def _version(value: bool) -> None:
    if value:
        from fedloom.core.version import __version__

        console.print(f"fedloom {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Federated learning across organisations: the model travels, the data stays."""


@plan_app.command("show")
@friendly
def plan_show(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    attackers: Annotated[
        int,
        typer.Option(
            min=0,
            help="Warn if the strategy cannot withstand this many attacking sites (as "
            "simulate --attackers).",
        ),
    ] = 0,
) -> None:
    """Print the validated plan and its hash, for a data owner to approve."""
    import yaml

    from fedloom.plan import attack_warnings, load_plan, plan_hash

    plan = load_plan(workspace, overrides or [])
    console.print(yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False).rstrip())
    console.print(f"\n[bold]sites[/]: {', '.join(plan.roster)}")
    console.print(f"[bold]plan hash[/]: {plan_hash(plan, workspace)}")
    if plan.model.base is not None:
        from fedloom.workspace import base_model_digest, base_model_folder

        folder = base_model_folder(Path(workspace).resolve(), plan.model.base)
        console.print(f"[bold]base model[/]: {folder}  digest {base_model_digest(folder)}")
    _warn(attack_warnings(plan, attackers))


def _warn(warnings: tuple[str, ...]) -> None:
    for warning in warnings:
        errors.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@app.command()
@friendly
def strategies() -> None:
    """List the aggregation strategies and their parameters."""
    from rich.table import Table

    from fedloom.strategies import STRATEGIES, build_strategy, parameter_defaults

    table = Table("name", "kind", "parameters (defaults)")
    for name, cls in STRATEGIES.items():
        defaults = parameter_defaults(name)
        params = ", ".join(f"{k}={v}" for k, v in defaults.items()) or "-"
        if not cls.needs_updates:
            kind = "mean (streaming)"
        elif build_strategy(name, {}).tolerated(11):  # withstands some attacking sites
            kind = "robust (buffers updates)"
        else:
            kind = "normalised mean (buffers updates)"
        table.add_row(name, kind, params)
    console.print(table)


@app.command()
@friendly
def simulate(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    sites: Annotated[int | None, typer.Option(help="Number of simulated sites.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Number of rounds.")] = None,
    partition: Annotated[
        str | None, typer.Option(help="iid, dirichlet:ALPHA, shards[:K] or quantity:ALPHA.")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Strategy name (see `fedloom strategies`).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="The plan's seed.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Workers for the sites' local work (default: the cores, or with --backend "
            "ray the Ray cluster's CPUs; 0: in this process)."
        ),
    ] = None,
    backend: Annotated[
        Backend,
        typer.Option(
            help="processes: worker processes on this machine. ray: Ray actors on a Ray "
            "cluster (pip install 'fedloom\\[ray]')."
        ),
    ] = Backend.PROCESSES,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="With --backend ray: the cluster's head, HOST:PORT (default: RAY_ADDRESS; "
            "without either, a local Ray instance for this run)."
        ),
    ] = None,
    ray_workspace: Annotated[
        str | None,
        typer.Option(
            help="With --backend ray: the workspace's path on the cluster's nodes, if they "
            "share a filesystem with this machine (default: Ray ships a copy of it)."
        ),
    ] = None,
    roundtrip: Annotated[
        bool, typer.Option(help="Serialise every message to the wire format and back.")
    ] = False,
    transport: Annotated[
        Transport,
        typer.Option(
            help="inprocess: sites in worker processes of this command. grpc: the aggregator "
            "and every site as their own OS processes on loopback, with mutual TLS."
        ),
    ] = Transport.INPROCESS,
    attack: Annotated[
        str | None,
        typer.Option(
            help="Make sites misbehave: sign-flip, scale:K, gaussian[:SIGMA], label-flip."
        ),
    ] = None,
    attackers: Annotated[int, typer.Option(help="How many sites run --attack.")] = 0,
    baseline: Annotated[
        bool, typer.Option(help="Also train the model centrally on the pooled data.")
    ] = False,
    gpus: Annotated[
        int,
        typer.Option(
            min=0,
            help="Pin worker i to GPU i % N (workers sharing a GPU split its memory; 0: the "
            "plan's training.device).",
        ),
    ] = 0,
    run_name: RunNameOption = None,
    runs_dir: RunsDirOption = None,
    track: TrackOption = None,
    quiet: QuietOption = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", help="Show a failed task's whole traceback here, and log debug detail."
        ),
    ] = False,
) -> None:
    """Run the workspace's federation with simulated sites, on this machine or, with
    --backend ray, on a Ray cluster.

    Writes runs/<run-name>/: metrics.jsonl, summary.json, final.safetensors,
    plan.json, <primary metric>.png (accuracy.png for a classifier), run.log (with a failed
    task's traceback) and sites/ (each simulated site's state folder).
    """
    from fedloom.cli.results import (
        RUN_LOG,
        FailureLines,
        fresh_run_dir,
        print_results,
        showing_run,
    )
    from fedloom.plan import attack_warnings, load_plan, plan_hash
    from fedloom.report import RunRecorder
    from fedloom.results import SiteFailed
    from fedloom.simulation.attack_setup import make_attack
    from fedloom.simulation.options import SimulationOptions
    from fedloom.simulation.run import simulate as run_simulation
    from fedloom.tracking import parse_track

    flags = {
        "sites": sites,
        "rounds": rounds,
        "data.partition": partition,
        "strategy.name": strategy,
        "seed": seed,
    }
    all_overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(overrides or [])
    ray_flags = {"--ray-address": ray_address, "--ray-workspace": ray_workspace}
    if backend is not Backend.RAY and any(v is not None for v in ray_flags.values()):
        used = ", ".join(k for k, v in ray_flags.items() if v is not None)
        raise PlanError([f"{used}: only with --backend ray"], source="command line")
    if transport is Transport.GRPC:
        from fedloom.deployment.launcher import run_local_grpc

        ignored = {
            "--workers": workers is not None,
            "--roundtrip": roundtrip,
            "--attack": attack is not None,
            "--attackers": attackers != 0,
            "--baseline": baseline,
            "--backend ray": backend is Backend.RAY,
            "--gpus": gpus != 0,
        }
        if any(ignored.values()):
            used = ", ".join(k for k, v in ignored.items() if v)
            raise PlanError(
                [f"{used}: only with --transport inprocess (every site is its own process)"],
                source="command line",
            )
        parse_track(track or [])  # checked here, used by the aggregator
        code = run_local_grpc(
            workspace,
            all_overrides,
            run_name=run_name,
            runs_dir=runs_dir,
            quiet=quiet,
            track=track or [],
        )
        raise typer.Exit(code)
    ray = None
    if backend is Backend.RAY:
        from fedloom.simulation.ray_backend import RayBackend, require_ray

        address = ray_address or os.environ.get("RAY_ADDRESS") or None
        ray = RayBackend(address=address, workspace=ray_workspace)
        require_ray(ray, workers)
    plan = load_plan(workspace, all_overrides)
    digest = plan_hash(plan, workspace)
    tracking = parse_track(track or [])
    if gpus:
        from fedloom.runtime.devices import check_gpus

        check_gpus(gpus)  # before anything is written or any worker starts
    console.print(
        f"[bold]{plan.name}[/]: {count(len(plan.roster), 'site')}, "
        f"{count(plan.rounds, 'round')}, "
        f"strategy {plan.strategy.name}, data {data_text(plan)}"
    )
    console.print(f"plan hash [cyan]{digest}[/]")
    if ray is not None:
        where = (
            "a local Ray instance, started for this run (no --ray-address or RAY_ADDRESS)"
            if ray.address is None
            else f"the Ray cluster at {ray.address}"
        )
        how = (
            "the workspace shipped to it"
            if ray.workspace is None
            else f"the workspace read at {ray.workspace} on its nodes"
        )
        console.print(f"sites' local work on {where}, {how}", highlight=False, markup=False)
    options = SimulationOptions(
        workers=workers,
        backend=ray,
        roundtrip=roundtrip,
        attack=attack,
        attackers=attackers,
        baseline=baseline,
        gpus=gpus,
    )
    attacking = make_attack(plan, options)  # a bad one is refused before anything is written
    if attacking is not None:
        console.print(attack_line(attacking, len(plan.roster)), highlight=False, markup=False)
    _warn(attack_warnings(plan, attackers))
    starting = starting_line(plan, options)
    recorder = RunRecorder(fresh_run_dir(workspace, run_name, runs_dir), plan=plan)
    run_dir = recorder.run_dir
    # each simulated site's state folder lives in the run: runs/<run-name>/sites/<site>
    options = dataclasses.replace(options, state_root=run_dir / "sites")
    with run_log(run_dir / RUN_LOG, verbose=verbose):
        logging.getLogger("fedloom.simulation").info(
            "simulating %s (plan hash %s) with %s", plan.name, digest, workers_text(options)
        )
        failures = FailureLines(run_dir / RUN_LOG, verbose=verbose)
        if starting:  # the bar appears once they are up (RoundProgress)
            console.print(starting, highlight=False)
        try:
            start_tracking(recorder, tracking, plan, digest, workspace)
            with showing_run(recorder, plan.rounds, quiet=quiet) as hooks:

                def on_failure(failure: SiteFailed) -> None:
                    recorder.site_failed(failure)
                    failures.show(failure)

                result = run_simulation(
                    workspace,
                    plan,
                    options,
                    on_event=hooks.on_event,
                    on_failure=on_failure,
                    on_metrics=hooks.on_metrics,
                )
        except BaseException as err:
            recorder.fail(plan, digest, err)
            failures.fatal(err)
            errors.print(f"what the run did is in {run_dir}", highlight=False)
            raise
        print_results(recorder, result)
        warn_dropped_trackers(recorder)


app.command("evaluate")(evaluate)
app.command("contributions")(contributions)
app.command("analyze")(analyze)
app.command("report")(report)
app.command("status")(status)  # after simulate: `fedloom --help` lists commands in this order
app.command("dashboard")(dashboard)
app.command("docs")(docs)


def main() -> None:
    """Entry point of the ``fedloom`` command."""
    # gRPC's C core writes its own log lines on stderr ("E0000 ... add_port.cc ... Failed
    # to add port"), ahead of fedloom's message saying the same in its words: silent
    # unless GRPC_VERBOSITY asks for them. The core reads it once, when grpc is first
    # imported: no command has imported it before this line.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    app()
