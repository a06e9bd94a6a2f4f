"""What every ``fedloom`` command shares: the consoles and the error mapping."""

from __future__ import annotations

import enum
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fedloom.core.errors import FedloomError, disk_error
from fedloom.core.site_name import site_name_problem

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fedloom.plan import Plan
    from fedloom.report import RunRecorder
    from fedloom.tracking import TrackSpec

UNWRAPPED = 10_000
"""The width of a console that is not a terminal, where COLUMNS does not say one."""


def _console(stream: TextIO, *, stderr: bool = False) -> Console:
    """A console on ``stream``. A terminal wraps at its width. Written to a file or a
    pipe (a log, CI, a test), a line is never wrapped at 80 columns in the middle of a
    path or a sentence, and a table or the progress line is never cut to fit 80: it is
    as wide as it needs to be (COLUMNS, where set, still gives the width)."""
    tty = stream.isatty()
    wide = not tty and not os.environ.get("COLUMNS", "").isdigit()
    return Console(stderr=stderr, soft_wrap=not tty, width=UNWRAPPED if wide else None)


console = _console(sys.stdout)
errors = _console(sys.stderr, stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def warn(message: str) -> None:
    """A warning on the error stream: seen on the screen, kept out of piped output."""
    errors.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def friendly(command: F) -> F:
    """fedloom's errors become a message and the error's exit code, never a traceback;
    Ctrl-C exits 130. An OSError from the environment (a read-only file system, a
    permission refused, a full disk) becomes a :class:`~fedloom.core.errors.DiskError` naming
    the path: exit code 14."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FedloomError as err:
            errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            errors.print("interrupted: stopped cleanly")
            raise typer.Exit(130) from None
        except OSError as err:
            disk = disk_error(err)
            if disk is None:
                raise
            errors.print(f"[bold red]error:[/] {escape(str(disk))}", highlight=False)
            raise typer.Exit(disk.exit_code) from None

    return wrapper  # type: ignore[return-value]


WorkspaceArg = Annotated[
    Path, typer.Argument(help="Workspace folder holding federation.yaml and the task module.")
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Plan overrides as key=value, e.g. rounds=5 training.lr=0.1 (every party of a "
        "federation uses the same ones: they change the plan hash)."
    ),
]
RunNameOption = Annotated[
    str | None, typer.Option(help="Folder name under runs/ (default: a timestamp).")
]
RunsDirOption = Annotated[
    Path | None, typer.Option(help="Where runs go (default: WORKSPACE/runs).")
]
QuietOption = Annotated[bool, typer.Option(help="No progress bar.")]


def site_name(value: str) -> str:
    """A typer callback: a ``--name`` that breaks the site-name rule is a usage error
    (exit code 2), before the command touches the disk."""
    problem = site_name_problem(value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return value


def count(n: int, noun: str) -> str:
    """``1 round``, ``2 rounds``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def human_bytes(n: float) -> str:
    """``812 B``, ``3.4 MB``: decimal units."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


TrackOption = Annotated[
    list[str] | None,
    typer.Option(
        "--track",
        help="Track the run: mlflow (the store MLFLOW_TRACKING_URI names, else "
        "runs/mlflow.db), mlflow=URI, tensorboard (runs/<run>/tensorboard) or "
        "tensorboard=DIR; repeat for both.",
    ),
]


def start_tracking(
    recorder: RunRecorder, specs: Sequence[TrackSpec], plan: Plan, digest: str, workspace: Path
) -> None:
    """Give ``recorder`` (a :class:`~fedloom.report.RunRecorder`) the trackers the
    checked ``--track`` values name, and say where each writes. A tracker that cannot
    start raises, before any round."""
    if not specs:
        return
    from fedloom.tracking import open_trackers

    recorder.tracker = open_trackers(specs, plan, digest, recorder.run_dir, Path(workspace))
    for tracker in recorder.tracker.trackers:  # each names where it writes
        where = getattr(tracker, "uri", None) or getattr(tracker, "logdir", "")
        console.print(f"tracking: {tracker.name} at {escape(str(where))}", highlight=False)


def warn_dropped_trackers(recorder: RunRecorder) -> None:
    """Say which trackers failed during the run (the run itself went on)."""
    for line in recorder.tracker.dropped if recorder.tracker is not None else ():
        warn(f"tracking stopped: {line}")


class Transport(enum.Enum):
    """How a simulated federation's parties talk: in this process, or as real OS
    processes over gRPC with mutual TLS on loopback."""

    INPROCESS = "inprocess"
    GRPC = "grpc"


TransportOption = Annotated[
    Transport,
    typer.Option(
        help="inprocess: simulated sites; grpc: an aggregator and a collaborator per "
        "site as real processes with mutual TLS on loopback."
    ),
]
