"""``fedloom dashboard WORKSPACE``: a live, read-only web page of the aggregator's state,
and the same page inside the aggregator's process (``aggregator start --dashboard``).

The server (:mod:`fedloom.dashboard`) reads WORKSPACE/aggregator/state.db without writing
it, so it runs beside an aggregator or on a stopped workspace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedloom.cli.common import WorkspaceArg, console, friendly

if TYPE_CHECKING:
    from fedloom.dashboard import Dashboard

# copies of fedloom.dashboard's (a test checks they agree): --help imports nothing more
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "FEDLOOM_DASHBOARD_TOKEN"


@friendly
def dashboard(
    workspace: WorkspaceArg,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on; any other than loopback needs a token (--token-file).",
        ),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = (
        DEFAULT_PORT
    ),
    run: Annotated[
        str | None, typer.Option("--run", help="The run's name (default: the latest run).")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help=f"A file holding the token every request must show (else {TOKEN_ENV}).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve a live, read-only web page of the aggregator's state: the run, the round
    under way, each site's status and last contact, failures and their reasons, metric
    curves, the privacy spent, the bytes moved. It changes nothing.

    Reads WORKSPACE/aggregator/state.db without writing it, like `fedloom status`.
    Ctrl-C stops it.
    """
    board = open_dashboard(workspace, host, port, run, token_file)
    try:
        board.serve_forever()
    except KeyboardInterrupt:
        console.print("dashboard stopped")
    finally:
        board.close()


def open_dashboard(
    workspace: Path, host: str, port: int, run_name: str | None, token_file: Path | None
) -> Dashboard:
    """The dashboard of ``workspace``, listening (not serving yet), its address printed;
    a token from ``token_file`` or FEDLOOM_DASHBOARD_TOKEN."""
    from fedloom.core.errors import PlanError
    from fedloom.dashboard import Dashboard, exposure_problem, token_from

    try:
        token = token_from(token_file, os.environ)
    except OSError as err:
        unread = f"--token-file: cannot read {token_file}: {err.strerror or err}"
        raise PlanError([unread], source="command line") from err
    if token_file is not None and not token:
        raise PlanError([f"--token-file: {token_file} is empty"], source="command line")
    problem = exposure_problem(host, token)
    if problem is not None:
        raise PlanError([f"--host {host}: {problem}"], source="command line")
    board = Dashboard(
        Path(workspace) / "aggregator", host=host, port=port, run_name=run_name, token=token
    )
    console.print(
        f"dashboard of {workspace} (read-only) on [bold]{board.url}[/]"
        + (" (open it with ?token=TOKEN, the token it was given)" if token else ""),
        highlight=False,
        soft_wrap=True,
    )
    return board


def start_beside(workspace: Path, where: str) -> Dashboard:
    """``aggregator start --dashboard [HOST:]PORT``: the dashboard in a daemon thread of
    this process (a token from FEDLOOM_DASHBOARD_TOKEN)."""
    host, _, port = where.rpartition(":")
    if not port.isdigit():
        from fedloom.core.errors import PlanError

        problem = f"--dashboard: give a port, or HOST:PORT (got {where!r})"
        raise PlanError([problem], source="command line")
    board = open_dashboard(workspace, host.strip("[]") or DEFAULT_HOST, int(port), None, None)
    board.start()
    return board
