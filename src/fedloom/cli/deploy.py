"""``fedloom aggregator start`` and ``stop``: a real federation's aggregator, and the
running helpers both sides share (``fedloom collaborator start`` is in
:mod:`fedloom.cli.collaborator`).

Both log to a file (``--log``), show progress on the terminal, and stop cleanly on
Ctrl-C: the work runs in a thread and the main thread only waits, so the interrupt
is always delivered at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape

from fedloom.cli.common import (
    Overrides,
    QuietOption,
    RunNameOption,
    RunsDirOption,
    TrackOption,
    WorkspaceArg,
    console,
    count,
    errors,
    friendly,
    start_tracking,
    warn,
    warn_dropped_trackers,
)

if TYPE_CHECKING:
    from fedloom.core.records import RoundRecord
    from fedloom.deployment.resume import OpenedRun
    from fedloom.deployment.sitepolicy import PolicyFiles

aggregator_app = typer.Typer(
    help="Run the federation's aggregator (a gRPC server).", no_args_is_help=True
)

T = TypeVar("T")

LogOption = Annotated[
    Path | None, typer.Option("--log", help="Log file (default: given in the description).")
]
VerboseOption = Annotated[bool, typer.Option("--verbose", help="Log debug detail too.")]


def start_logging(path: Path, *, verbose: bool = False) -> None:
    """Log fedloom's records to ``path``; SIGTERM (a service manager stopping the
    process) is handled like Ctrl-C, so the run still records how it ended."""
    signal.signal(signal.SIGTERM, _terminate)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedloom")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def run_log(path: Path, *, verbose: bool = False) -> Iterator[None]:
    """Log fedloom's records to ``path`` while the block runs (a simulation's
    ``run.log``): debug detail too with ``verbose``."""
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fedloom")
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


class _LogFile(logging.FileHandler):
    """A log file that, when the disk refuses a record (full, or made read-only), says
    so once on the terminal and drops the records after it, instead of a traceback for
    each: the run goes on, and its state says what it did."""

    _said = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not self._said:
            self._said = True
            _, err, _ = sys.exc_info()
            errors.print(
                f"[yellow]warning:[/] cannot write the log {self.baseFilename}: {err}; "
                "its records are dropped (free space or fix the disk to have them again)",
                highlight=False,
            )


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cancel(signum: int, frame: Any) -> None:
    from fedloom.core.errors import Cancelled
    from fedloom.deployment.control import CANCEL_NOTE

    raise Cancelled(CANCEL_NOTE)


def in_thread(work: Callable[[threading.Event], T], stop: threading.Event) -> T:
    """Run ``work(stop)`` in a thread; Ctrl-C sets ``stop`` and re-raises here."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work(stop)
        except BaseException as err:  # handed to the main thread
            box["error"] = err
        finally:
            done.set()

    done = threading.Event()
    thread = threading.Thread(target=target, name="fedloom-main", daemon=True)
    thread.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        stop.set()
        thread.join(timeout=10)
        raise
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


@aggregator_app.command("start")
@friendly
def aggregator_start(
    workspace: WorkspaceArg,
    overrides: Overrides = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",  # noqa: S104
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 7171,
    new_run: Annotated[
        bool,
        typer.Option(
            "--new-run",
            help="Start a new run even if the latest one is unfinished (it stays on disk).",
        ),
    ] = False,
    run_name: RunNameOption = None,
    runs_dir: RunsDirOption = None,
    heartbeat: Annotated[float, typer.Option(help="Seconds between site heartbeats.")] = 5.0,
    dead_after: Annotated[
        float | None,
        typer.Option(
            help="Drop a site from the round once it has been silent this many seconds "
            "(default: 3 heartbeats)."
        ),
    ] = None,
    keep_checkpoints: Annotated[
        int, typer.Option(help="Checkpoints of finished rounds kept on disk.", min=1)
    ] = 3,
    log: LogOption = None,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
    track: TrackOption = None,
    evaluate: Annotated[
        Path | None,
        typer.Option(
            help="Evaluate this model (a safetensors file, a run folder or a checkpoint) at "
            "every site instead of training: a new run, never resumed.",
        ),
    ] = None,
    dashboard: Annotated[
        str | None,
        typer.Option(
            help="Also serve the read-only dashboard on [HOST:]PORT (HOST: 127.0.0.1; "
            "another needs a token in FEDLOOM_DASHBOARD_TOKEN).",
            show_default=False,
        ),
    ] = None,
    announce_fd: Annotated[int | None, typer.Option(hidden=True)] = None,
    fault: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Serve the workspace's federation to its sites over gRPC with mutual TLS.

    Resumes the latest unfinished run from its last finished round (state in
    WORKSPACE/aggregator/); --new-run starts afresh. Needs WORKSPACE/pki from
    `fedloom pki init`. Logs to WORKSPACE/aggregator/aggregator.log; writes
    runs/<run-name>/ like `fedloom simulate`.
    """
    from fedloom.cli.evaluate import record_evaluation
    from fedloom.cli.results import fresh_run_dir, print_results, showing_run
    from fedloom.core.clock import kill_fault
    from fedloom.core.errors import Cancelled
    from fedloom.core.events import Event, SiteRejoined, SiteWithdrew
    from fedloom.deployment.control import CANCEL_SIGNAL
    from fedloom.deployment.resume import open_run, state_dir_of
    from fedloom.deployment.server import ServeOptions, address_of, serve
    from fedloom.pki import RevocationList, server_credentials, server_hosts
    from fedloom.pki.common import CRL_FILE, pki_dir_of
    from fedloom.plan import load_plan, plan_hash
    from fedloom.report import RunRecorder
    from fedloom.store.model_file import load_model
    from fedloom.tracking import parse_track

    plan = load_plan(workspace, list(overrides or []))
    digest = plan_hash(plan, workspace)
    tracking = parse_track(track or [])
    model = load_model(evaluate) if evaluate is not None else None
    new_run = new_run or model is not None  # an evaluation is a run of its own
    # a missing or damaged PKI is said before anything is written
    credentials = server_credentials(pki_dir_of(workspace))
    RevocationList(pki_dir_of(workspace) / CRL_FILE, credentials.ca_pem)
    if dashboard is not None:  # a daemon thread: it ends with this process
        from fedloom.cli.dashboard import start_beside

        start_beside(workspace, dashboard)
    start_logging(log or state_dir_of(workspace) / "aggregator.log", verbose=verbose)
    signal.signal(CANCEL_SIGNAL, _cancel)  # `fedloom aggregator stop --cancel`
    made: list[RunRecorder] = []

    def new_run_dir() -> Path:
        made.append(RunRecorder(fresh_run_dir(workspace, run_name, runs_dir), plan=plan))
        return made[0].run_dir

    faults = kill_fault(fault) if fault else None
    opened = open_run(
        workspace,
        plan,
        new_run=new_run,
        run_dir=new_run_dir,
        run_name=run_name,
        keep_checkpoints=keep_checkpoints,
        faults=faults,
    )
    with contextlib.closing(opened):
        aggregator_log = logging.getLogger("fedloom.aggregator")
        for note in opened.notes:
            aggregator_log.warning("state: %s", note)
            errors.print(f"[yellow]state:[/] {note}", highlight=False)
        resume = opened.resume
        if resume is None:
            recorder = made[0]
        else:
            # a run rebuilt from its checkpoints has no per-site records to rewrite from
            recorder = RunRecorder.reopen(
                opened.run.run_dir, resume.history, rewrite=not opened.run.rebuilt, plan=plan
            )
            resumed = (
                f"resuming run {opened.run.name!r} from round {resume.next_round} of {plan.rounds}"
            )
            aggregator_log.info(resumed)
            console.print(f"[bold]{resumed}[/] (--new-run starts afresh)", highlight=False)
        console.print(
            f"[bold]{plan.name}[/]: {count(len(plan.roster), 'site')}, "
            f"{count(plan.rounds, 'round')}"
        )
        console.print(f"plan hash [cyan]{digest}[/]")
        options = ServeOptions(
            host=host, port=port, heartbeat_seconds=heartbeat, dead_after=dead_after, model=model
        )
        names = server_hosts(pki_dir_of(workspace))

        def listening(bound: int) -> None:
            where = ", ".join(address_of(n, bound) for n in names)
            console.print(
                f"listening on {address_of(host, bound)} (mutual TLS); sites connect to {where}",
                highlight=False,
            )
            if announce_fd is not None:
                os.write(announce_fd, f"{bound}\n".encode())
                os.close(announce_fd)

        done = 0 if resume is None else resume.next_round - 1

        def say(event: Event) -> None:
            if isinstance(event, SiteWithdrew):
                errors.print(
                    f"[yellow]warning:[/] site {event.site} withdrew: "
                    f"{escape(event.reason)} (rounds no longer wait for it; it "
                    "takes part again once it is started again)",
                    highlight=False,
                )
            elif isinstance(event, SiteRejoined):
                console.print(
                    f"site {event.site} said Hello again: rounds wait for it again",
                    highlight=False,
                )

        try:
            start_tracking(recorder, tracking, plan, digest, workspace)
            with showing_run(recorder, plan.rounds, quiet=quiet, done=done, also=say) as hooks:
                result = serve(
                    workspace,
                    plan,
                    opened,
                    options,
                    on_event=hooks.on_event,
                    on_listening=listening,
                    on_metrics=hooks.on_metrics,
                    on_finished=recorder.finish,  # the results, before the run is completed
                    faults=faults,
                )
        except BaseException as err:
            if opened.forgotten:  # it never opened a round: nothing to keep, or resume
                recorder.discard()
                raise
            recorder.fail(plan, digest, err, history=_recorded_history(opened))
            errors.print(f"what the run did is in {recorder.run_dir}", highlight=False)
            if isinstance(err, Cancelled):
                errors.print(
                    "cancelled: the federation is over and its run will not resume (the "
                    "next start begins a new run); sites that asked for work were told"
                )
                raise typer.Exit(130) from None
            raise
        print_results(recorder, result)
        if evaluate is not None:
            record_evaluation(recorder, result, evaluate)
        warn_dropped_trackers(recorder)


def show_policy(files: PolicyFiles, site: str) -> None:
    """Say on the screen which site policy the collaborator enforces, or that it has
    none, and name every ``policy.yaml`` it found and does not read. ``site`` is the
    workspace and options that name the site, for ``fedloom policy init``."""
    if files.in_use:
        console.print(f"site policy: {escape(str(files.path))}", highlight=False)
    else:
        warn(
            f"no site policy ({files.path} does not exist): this site enforces nothing "
            f"beyond the plan; write one with `fedloom policy init {site}`"
        )
    for other in files.unused:
        warn(
            f"{other} is not read: this site's policy is {files.path}; to enforce the "
            f"other instead, name it with --policy {other}"
            if files.in_use
            else f"{other} is not read: this site looks for its policy at {files.path}; "
            f"to enforce it, move it there or name it with --policy {other}"
        )


@aggregator_app.command("stop")
@friendly
def aggregator_stop(
    workspace: WorkspaceArg,
    cancel: Annotated[
        bool,
        typer.Option(
            "--cancel",
            help="End the federation for good: the run is recorded as cancelled and never "
            "resumed, and the sites are told to stop.",
        ),
    ] = False,
) -> None:
    """Stop the aggregator serving WORKSPACE (on this machine) as Ctrl-C would, and wait
    until it has exited.

    Its run is interrupted: the aggregator started again resumes it, and the sites wait
    for it meanwhile. With --cancel the run is over instead: recorded as cancelled and
    never resumed (the next start begins a new run), and the sites are told and stop
    (exit code 6). With no aggregator running, --cancel cancels the latest run if it is
    unfinished.
    """
    from fedloom.deployment.control import stop_aggregator
    from fedloom.store.database import ENDED

    what = "cancel the federation" if cancel else "stop"

    def signalled(pid: int) -> None:
        console.print(
            f"asked the aggregator (pid {pid}) to {what}; waiting for it to exit",
            highlight=False,
        )

    stopped = stop_aggregator(workspace, cancel=cancel, on_signalled=signalled)
    if stopped.pid is None:
        console.print(f"no aggregator is running on {workspace}", highlight=False)
    if stopped.run is None:
        console.print("there is no run", highlight=False)
        return
    console.print(f"run {stopped.run!r}: {stopped.status}", highlight=False)
    if stopped.status not in ENDED:
        console.print(
            f"[cyan]fedloom aggregator start {workspace}[/] resumes it; its sites wait for "
            "it meanwhile",
            highlight=False,
        )


def _recorded_history(opened: OpenedRun) -> list[RoundRecord] | None:
    """The run's attempts as its state database holds them, which ``fedloom status``
    reads (so a failed run's summary counts the same rounds); None if it cannot be
    read (the disk may be why the run ended)."""
    try:
        return opened.store.history(opened.run)
    except (sqlite3.Error, OSError, ValueError):
        return None
