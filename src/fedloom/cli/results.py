"""A run's folder and its results on the terminal, for `simulate` and `aggregator start`."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Column, Table
from rich.text import Text

from fedloom.cli.common import console, errors, human_bytes
from fedloom.core.errors import FedloomError, TaskFailed, WorkspaceError
from fedloom.figures import metric_names, worst_first
from fedloom.report import final_site_metrics
from fedloom.tasks.base import Metrics

MAX_COLUMNS = 6
"""The most metrics the sites' table shows (summary.json and metrics.jsonl have all)."""

if TYPE_CHECKING:
    from fedloom.core.events import Event
    from fedloom.plan import Plan
    from fedloom.report import RunRecorder
    from fedloom.results import SimulationResult, SiteFailed
    from fedloom.simulation.options import SimulationOptions
    from fedloom.transport.traffic import TrafficCounter

RUN_LOG = "run.log"  # a simulation's log, in its run folder


class FailureLines:
    """A simulation's failed sites on the terminal: without ``verbose`` one line each
    (the first :attr:`LIMIT` of them) and where the traceback is; with it, the task's
    whole traceback too. The run's log (``log``) has every one in full either way."""

    LIMIT = 5

    def __init__(self, log: Path, *, verbose: bool) -> None:
        self.log = log
        self.verbose = verbose
        self.shown = 0
        self._lock = threading.Lock()

    def show(self, failure: SiteFailed) -> None:
        """Say that ``failure``'s site failed (called from the sites' threads)."""
        with self._lock:
            self.shown += 1
            if self.shown > self.LIMIT and not self.verbose:
                if self.shown == self.LIMIT + 1:
                    self._say(f"more sites failed: every failure is in {self.log}")
                return
            line = f"{failure.site}, round {failure.round}: {failure.reason}"
            if not failure.traceback:
                self._say(line)
            elif self.verbose:
                self._say(f"{line}\n{failure.traceback}")
            else:
                self._say(f"{line} (its traceback is in {self.log}; --verbose shows it here)")

    def fatal(self, err: BaseException) -> None:
        """Log why the run ended early (the CLI then prints the error); a failed task's
        traceback goes to the log, and with ``verbose`` to the terminal too."""
        log = logging.getLogger("fedloom.simulation")
        if isinstance(err, KeyboardInterrupt):
            log.error("interrupted")
        elif isinstance(err, TaskFailed) and err.traceback:
            log.error("the run failed: %s\n%s", err.message, err.traceback)
            if self.verbose:
                self._say(err.traceback)
            else:
                self._say(f"the task's traceback is in {self.log} (--verbose shows it here)")
        elif isinstance(err, FedloomError):
            log.error("the run failed: %s", err)
        else:  # fedloom's own bug: its traceback, for the report
            log.error("the run failed", exc_info=err)

    @staticmethod
    def _say(text: str) -> None:
        errors.print(text, markup=False, highlight=False)


def fresh_run_dir(workspace: Path, run_name: str | None, runs_dir: Path | None) -> Path:
    """Where a run goes: ``runs_dir/run_name`` (default ``WORKSPACE/runs/<timestamp>``)."""
    if run_name is not None and (
        not run_name or Path(run_name).name != run_name or run_name in (".", "..")
    ):
        raise WorkspaceError(
            f"--run-name {run_name!r} must be a plain folder name",
            hint="no '/' and no '..'; use --runs-dir to choose where runs go",
        )
    run_root = runs_dir or workspace / "runs"
    return run_root / (run_name or _fresh_run_name(run_root))


@dataclass(frozen=True)
class RunHooks:
    """Where a run's events and its task's declared metrics go (``on_event``,
    ``on_metrics`` of ``run_simulation`` and ``serve``)."""

    on_event: Callable[[Event, TrafficCounter], None]
    on_metrics: Callable[[Metrics], None]


@contextlib.contextmanager
def showing_run(
    recorder: RunRecorder,
    rounds: int,
    *,
    quiet: bool,
    done: int = 0,
    also: Callable[[Event], None] | None = None,
) -> Iterator[RunHooks]:
    """One run on the terminal and in its folder, for `simulate` and `aggregator start`
    alike: the progress bar over its ``rounds`` (``done`` of them before a resume), and
    each event recorded in the run folder, then given to ``also``. Print the results
    with :func:`print_results` once the run returns."""
    from fedloom.cli.progress import RoundProgress

    with RoundProgress(console, rounds, enabled=not quiet, done=done) as progress:

        def on_event(event: Event, traffic: TrafficCounter) -> None:
            progress(event, traffic)
            recorder.on_event(event)
            if also is not None:
                also(event)

        yield RunHooks(on_event, progress.declared)


def simulate_recorded(
    workspace: Path,
    plan: Plan,
    digest: str,
    options: SimulationOptions,
    recorder: RunRecorder,
    *,
    quiet: bool,
    done: int = 0,
) -> SimulationResult:
    """Simulate ``plan`` (of hash ``digest``) into ``recorder``'s run folder behind the
    progress bar; a run that fails is recorded as failed before it raises."""
    from fedloom.simulation.run import simulate

    try:
        with showing_run(recorder, plan.rounds, quiet=quiet, done=done) as hooks:
            return simulate(
                workspace, plan, options, on_event=hooks.on_event, on_metrics=hooks.on_metrics
            )
    except BaseException as err:
        recorder.fail(plan, digest, err)
        raise


def print_results(recorder: RunRecorder, result: SimulationResult) -> None:
    """Finish the run folder and print the sites' table and the summary."""
    summary = recorder.finish(result)
    _print_sites(final_site_metrics(result.history), result.metrics)
    _print_summary(summary)
    _print_proxy(summary.get("contribution_proxy"))
    console.print(f"Results in [bold]{recorder.run_dir}[/]")


def _print_proxy(proxy: dict[str, Any] | None) -> None:
    """The aggregator's contribution proxy (evaluation.contributions), sites ranked."""
    if not proxy:
        return
    table = Table("rank", "site", "mean cosine", "mean norm", "rounds")
    table.title = "Each update against the federation's last step (contribution proxy)"
    for rank, site in enumerate(proxy["ranking"], start=1):
        row = proxy["sites"][site]
        table.add_row(
            str(rank), site, f"{row['mean_cosine']:+.4f}", f"{row['mean_norm']:.4g}",
            str(row["rounds"]),
        )  # fmt: skip
    console.print(table)


def _figure_keys(s: dict[str, object]) -> list[str]:
    """The summary's figures to show: the primary metric's test figure, the other test
    figures but the loss (it is in summary.json), then the primary's centralised
    baseline and the sites' mean and worst. A classifier's: ``test_accuracy``,
    ``centralized_accuracy``, ``mean_site_accuracy``, ``worst_site_accuracy``."""
    primary = s.get("primary_metric")
    tests = [k for k in s if k.startswith("test_") and k != "test_loss"]
    if not isinstance(primary, str):
        return tests
    first = f"test_{primary}"
    return [
        first,
        *(k for k in tests if k != first),
        f"centralized_{primary}",
        f"mean_site_{primary}",
        f"worst_site_{primary}",
        *(k for k in (f"mean_personal_{primary}", f"worst_personal_{primary}") if k in s),
    ]


def _fresh_run_name(run_root: Path) -> str:
    """A timestamp of the start, with a suffix if a run of that second exists."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name, n = stamp, 1
    while (run_root / name).exists():
        n += 1
        name = f"{stamp}-{n}"
    return name


def _print_sites(
    sites: dict[str, dict[str, float]], metrics: Metrics | None, limit: int = 20
) -> None:
    """The final global model at each site: the primary metric, then the others (at most
    :data:`MAX_COLUMNS` in all); past ``limit`` sites, the worst ones."""
    if not sites:
        return
    found = {k[len("global_") :] for m in sites.values() for k in m if k.startswith("global_")}
    if metrics is None:  # undeclared: the metrics in name order, the sites too
        names, ordered = sorted(found), sorted(sites)
    else:
        names = metric_names(metrics, found)
        ordered = worst_first(metrics, sites, f"global_{metrics.primary}")
    names = names[:MAX_COLUMNS]
    shown = ordered if len(ordered) <= limit else ordered[:limit]
    title = "Final global model at each site"
    if len(ordered) > limit:
        title += f" (the {limit} worst of {len(ordered)})"
    # a metric's name is text, never markup (a site may have chosen it)
    # Ditto's personal models (training.personal): their primary metric, by the global's
    personal = [n for n in names[:1] if any(f"personal_{n}" in m for m in sites.values())]
    columns = [
        *(Column(Text(n)) for n in names),
        *(Column(Text(f"personal {n}")) for n in personal),
    ]
    table = Table("site", "val samples", *columns, title=title)
    for site in sorted(shown):
        m = sites[site]
        table.add_row(
            site,
            f"{m.get('val_samples', 0):.0f}",
            *(f"{m.get(f'global_{n}', float('nan')):.4f}" for n in names),
            *(f"{m.get(f'personal_{n}', float('nan')):.4f}" for n in personal),
        )
    console.print(table)


def _print_summary(s: dict[str, object]) -> None:
    def fmt(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    table = Table("", "", title="Summary", show_header=False)
    counts = ["wall_seconds", "seconds_per_round", "bytes_sent", "bytes_received", "failures"]
    for key in [*_figure_keys(s), *counts]:
        table.add_row(Text(key), fmt(s.get(key)))
    federated, whole = s.get("federated_bytes"), s.get("model_bytes")
    if isinstance(federated, int) and isinstance(whole, int) and whole:
        table.add_row(
            "federated tensors",
            f"{human_bytes(federated)} of the model's {human_bytes(whole)} "
            f"({100 * federated / whole:.2f} %), each way per site and round",
        )
    if s.get("epsilon") is not None:
        by = f" ({str(s['accountant']).upper()} accountant)" if s.get("accountant") else ""
        table.add_row("epsilon", f"{fmt(s.get('epsilon'))} at delta {s.get('delta'):g}{by}")
    if s.get("dp_sgd_accountant"):
        table.add_row(
            "dp_sgd_epsilon",
            f"each site's, in metrics.jsonl ({str(s['dp_sgd_accountant']).upper()} accountant)",
        )
    if s.get("stopped_early"):
        table.add_row("stopped early", str(s["stopped_early"]))
    console.print(table)
