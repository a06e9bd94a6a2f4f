"""``fedloom collaborator start``: a site's side of a real federation.

It logs to a file (``--log``), shows progress on the terminal, and stops cleanly on
Ctrl-C, with the running helpers of :mod:`fedloom.cli.deploy`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedloom.cli.common import Overrides, WorkspaceArg, console, count, errors, friendly, site_name
from fedloom.cli.deploy import LogOption, in_thread, show_policy, start_logging

collaborator_app = typer.Typer(
    help="Run a site's collaborator (connects out to the aggregator).", no_args_is_help=True
)


def _device(value: str | None) -> str | None:
    """A typer callback: a ``--device`` fedloom does not know is a usage error (exit
    code 2); one this machine lacks is said before the site joins (exit code 3)."""
    from fedloom.plan import device_problem

    problem = None if value is None else device_problem(value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return value


@collaborator_app.command("start")
@friendly
def collaborator_start(
    workspace: WorkspaceArg,
    name: Annotated[
        str, typer.Option(help="This site's name (its certificate's).", callback=site_name)
    ],
    overrides: Overrides = None,
    aggregator: Annotated[
        str, typer.Option("--aggregator", help="The aggregator's host:port.")
    ] = "localhost:7171",
    data: Annotated[
        Path | None,
        typer.Option(
            help="This site's data: a file or folder the task's data function reads "
            "(context.data_path), or for a task without one an .npz with x and y (or "
            "x_train, y_train, x_val, y_val). Default: the site's share of the plan's "
            "built-in dataset (demo)."
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Where this site's torch code runs: auto, cpu, cuda, cuda:N or mps "
            "(default: the plan's training.device). Not part of the plan hash.",
            callback=_device,
        ),
    ] = None,
    state: Annotated[
        Path | None, typer.Option(help="The site's state folder (default: WORKSPACE/sites/NAME).")
    ] = None,
    server_name: Annotated[
        str | None,
        typer.Option(help="The name in the aggregator's certificate, if not the host's."),
    ] = None,
    give_up_after: Annotated[
        float | None,
        typer.Option(
            help="Give up once the aggregator has not answered for this many seconds "
            "(default: never)."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads for local training.")] = 1,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="The data owner's policy.yaml, checked before any data is read "
            "(default: STATE/policy.yaml when it exists, where `fedloom policy init "
            "--name NAME` writes it).",
        ),
    ] = None,
    log: LogOption = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Log debug detail too, and show a failed task's traceback here (the log "
            "always has it).",
        ),
    ] = False,
    fault: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Take part in the federation as site NAME: connect out, train locally, send updates.

    The site's key and certificates come from `fedloom pki request` / `accept`.
    Logs to STATE/collaborator.log; the task keeps its own files in STATE/task. A site
    whose data does not fit the model tells the aggregator it withdraws, and exits (3).
    """
    from fedloom.core.clock import kill_fault
    from fedloom.deployment.site import SiteOptions, participate
    from fedloom.deployment.sitepolicy import site_policy_files
    from fedloom.deployment.siteprogress import SiteProgress
    from fedloom.pki.common import make_private_dir, site_state_dir
    from fedloom.plan import load_plan

    plan = load_plan(workspace, list(overrides or []))
    state_dir = state or site_state_dir(workspace, name)
    make_private_dir(state_dir)  # its key goes here
    log_path = log or state_dir / "collaborator.log"
    start_logging(log_path, verbose=verbose)
    options = SiteOptions(
        name=name,
        address=aggregator,
        state_dir=state_dir,
        data=data,
        device=device,
        server_name=server_name,
        connect_seconds=give_up_after,
        threads=threads,
        policy=policy,
    )
    show_policy(
        site_policy_files(workspace, name, state_dir, policy),
        f"{workspace} --name {name}" + (f" --state {state}" if state else ""),
    )
    # "joined" once the aggregator answered; meanwhile each change of why it waits
    console.print(f"site [bold]{name}[/] of {plan.name}: connecting to {aggregator}")

    def notice(line: str) -> None:
        console.print(escape(line), highlight=False)

    def show(p: SiteProgress) -> None:
        console.print(f"{p.last}  [dim]({p.rounds_done} accepted, {p.rounds_failed} failed)[/]")
        if p.traceback:  # the log has it always; the screen with --verbose
            if verbose:
                errors.print(p.traceback, markup=False, highlight=False)
            else:
                errors.print(
                    f"  its traceback is in {log_path} (--verbose shows it here)", highlight=False
                )

    try:
        done = in_thread(
            lambda stop: participate(
                workspace,
                plan,
                options,
                stop=stop,
                on_progress=show,
                on_notice=notice,
                faults=kill_fault(fault) if fault else None,
            ),
            threading.Event(),
        )
    except BaseException as err:
        how = (
            "interrupted" if isinstance(err, KeyboardInterrupt) else str(err) or type(err).__name__
        )
        logging.getLogger("fedloom.collaborator").error("stopped: %s", how)
        raise
    evaluated = "; the final model evaluated here" if done.evaluated else ""
    ended = (
        f"federation finished: {count(done.rounds_done, 'update')} accepted, "
        f"{done.rounds_failed} round(s) failed{evaluated}"
    )
    logging.getLogger("fedloom.collaborator").info(ended)
    console.print(ended)
    if done.final_model is not None:
        console.print(
            f"the final model is kept in {done.final_model} (check it: fedloom audit model "
            f"{done.final_model})",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
