"""``fedloom report RUN``: a run folder as one self-contained HTML file
(docs/cli/report.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedloom.cli.common import console, friendly


@friendly
def report(
    run: Annotated[
        Path,
        typer.Argument(
            help="A run folder (WORKSPACE/runs/<run-name>) that `fedloom simulate`, "
            "`fedloom contributions` or the aggregator wrote.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The HTML file to write (default: RUN/report.html)."),
    ] = None,
) -> None:
    """Write one self-contained HTML file of a run: the plan and its hash, the summary,
    the metric curves, each site's final figures, contribution scores, the privacy
    spent and every failure. It loads nothing from the network."""
    from fedloom.core.errors import naming
    from fedloom.core.files import write_atomic
    from fedloom.html_report import render

    page = render(run)
    target = out if out is not None else run / "report.html"
    with naming(target):
        write_atomic(target, page.encode())
    console.print(f"report of {run} in [bold]{target}[/] ({len(page) / 1024:.0f} KB)")
