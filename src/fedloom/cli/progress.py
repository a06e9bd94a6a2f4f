"""Live progress of a federation: round r/R, sites done, bytes moved, ETA."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedloom.cli.common import human_bytes
from fedloom.orchestration import Event, RoundClosed, RoundOpened, SiteAnswered
from fedloom.records import CloseReason
from fedloom.tasks.base import CLASSIFICATION, Metrics
from fedloom.transport.inprocess import TrafficCounter


class RoundProgress:
    """A rich progress bar over rounds, fed by the aggregator's events."""

    def __init__(
        self,
        console: Console,
        rounds: int,
        *,
        enabled: bool = True,
        done: int = 0,
        metrics: Metrics = CLASSIFICATION,
    ) -> None:
        self.rounds = rounds
        self.metrics = metrics  # the task's; the runtime may say it later (declared())
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(
            f"round {done}", total=rounds + 1, completed=done, detail=""
        )
        self._selected = 0
        self._done = 0
        self._round = 0
        self._last = ""

    def declared(self, metrics: Metrics) -> None:
        """The task's declared metrics, once the runtime loaded it: the line shows its
        primary metric."""
        self.metrics = metrics

    def __enter__(self) -> RoundProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: Event, traffic: TrafficCounter) -> None:
        if isinstance(event, RoundOpened):
            self._round, self._selected, self._done = event.round, len(event.selected), 0
        elif isinstance(event, SiteAnswered):
            self._done += 1
        elif isinstance(event, RoundClosed):
            primary = self.metrics.primary
            value = event.record.metrics.get(f"global_{primary}")
            label = f"val {escape(primary)} (global model)"  # the sites' validation splits
            self._last = "" if value is None else f" · {label} {value:.3f}"
            epsilon = event.record.privacy.get("epsilon")
            if isinstance(epsilon, float):
                accountant = str(event.record.privacy.get("accountant", "")).upper()
                self._last += f" · ε {epsilon:.3g} {accountant}".rstrip()
            # after no quorum a retry follows; after a stop, nothing more here
            if event.record.close_reason not in (CloseReason.NO_QUORUM, CloseReason.STOPPED):
                self.progress.advance(self.task)
        label = (
            "final evaluation"
            if self._round > self.rounds
            else f"round {min(self._round, self.rounds)}/{self.rounds}"
        )
        moved = human_bytes(traffic.sent + traffic.received)
        detail = f"sites {self._done}/{self._selected} · {moved}{self._last}"
        self.progress.update(self.task, description=label, detail=detail)
