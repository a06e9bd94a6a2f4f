"""``fedloom simulate --transport grpc``: the real deployment, on one machine.

Makes the federation's PKI in the workspace (a CA, the aggregator's certificate, and
for every site a key made in its own state folder, a signing request and a signed
certificate: the same steps as across organisations), starts ``fedloom aggregator
start`` on a free loopback port and one ``fedloom collaborator start`` per site, each
its own OS process, and waits for them. The aggregator's output (progress, tables,
the run folder) is this command's output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedloom.pki import provision
from fedloom.plan import load_plan

COLLABORATOR_GRACE = 30.0  # seconds sites get to exit after the aggregator did


def fedloom_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedloom.cli", *args]


def start_aggregator(
    workspace: Path, overrides: Sequence[str], *extra: str, port: int = 0, **popen: Any
) -> tuple[subprocess.Popen[bytes], int | None]:
    """``fedloom aggregator start`` on loopback ``port`` (0: a free one), as its own
    process.

    Returns the process and the port it listens on, or ``None`` when it ended before
    listening (it said why on its output). ``extra`` are more command-line options;
    ``popen`` goes to :class:`subprocess.Popen`.
    """
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(  # noqa: S603 - our own command
            fedloom_command(
                "aggregator",
                "start",
                str(workspace),
                *overrides,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--announce-fd",
                str(write_end),
                *extra,
            ),
            pass_fds=(write_end,),
            **popen,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as announced:
        line = announced.readline().strip()  # blocks until it listens, or ends
    return proc, int(line) if line else None


def start_collaborator(
    workspace: Path, overrides: Sequence[str], site: str, port: int, *extra: str, **popen: Any
) -> subprocess.Popen[bytes]:
    """``fedloom collaborator start`` for ``site``, connecting to ``127.0.0.1:port``."""
    return subprocess.Popen(  # noqa: S603 - our own command
        fedloom_command(
            "collaborator",
            "start",
            str(workspace),
            *overrides,
            "--name",
            site,
            "--aggregator",
            f"127.0.0.1:{port}",
            *extra,
        ),
        stdin=subprocess.DEVNULL,
        **popen,
    )


def run_local_grpc(
    workspace: Path,
    overrides: Sequence[str],
    *,
    run_name: str | None = None,
    runs_dir: Path | None = None,
    quiet: bool = False,
    track: Sequence[str] = (),
    evaluate: Path | None = None,
    give_up_after: float = 120.0,
) -> int:
    """Run the federation as real processes on loopback; the aggregator's exit code."""
    ws = workspace.resolve()
    plan = load_plan(ws, list(overrides))
    states = provision(ws, plan.roster)
    # a rehearsal starts afresh: an unfinished run left by an earlier one stays on disk
    extra = ["--new-run", *(["--run-name", run_name] if run_name else [])]
    extra += [*(["--runs-dir", str(runs_dir)] if runs_dir else [])]
    extra += ["--quiet"] if quiet else []
    extra += [arg for value in track for arg in ("--track", value)]  # the aggregator tracks
    extra += ["--evaluate", str(evaluate.resolve())] if evaluate is not None else []
    aggregator, port = start_aggregator(ws, overrides, *extra)
    sites: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if port is None:
            return aggregator.wait()  # it failed before listening and said why
        for site, state in states.items():
            with open(state / "collaborator.out", "wb") as out:
                sites[site] = start_collaborator(
                    ws,
                    overrides,
                    site,
                    port,
                    "--state",
                    str(state),
                    "--give-up-after",
                    str(give_up_after),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        code = aggregator.wait()
        _settle_sites(sites, states, completed=code == 0)
        return code
    except BaseException:
        for proc in (aggregator, *sites.values()):
            proc.terminate()
        for proc in (aggregator, *sites.values()):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise


def _settle_sites(
    sites: dict[str, subprocess.Popen[bytes]], states: dict[str, Path], *, completed: bool
) -> None:
    """Wait for the sites to exit after the aggregator did, and name those that did not
    end cleanly. After an aggregator that did not complete the federation, the sites
    wait for it to be started again, which a rehearsal never does: those still waiting
    are stopped (SIGTERM, as Ctrl-C)."""
    failed: list[str] = []
    for site, proc in sites.items():
        if not completed and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=COLLABORATOR_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            continue
        try:
            code = proc.wait(timeout=COLLABORATOR_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
        if code != 0:
            failed.append(f"{site} (exit {code}; see {states[site] / 'collaborator.out'})")
    if failed:
        print("collaborators that did not end cleanly: " + ", ".join(failed), file=sys.stderr)
