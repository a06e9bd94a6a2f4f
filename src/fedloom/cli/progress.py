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
from fedloom.core.events import Event, RoundClosed, RoundOpened, SiteAnswered
from fedloom.core.records import CloseReason
from fedloom.tasks.base import CLASSIFICATION, Metrics
from fedloom.transport.traffic import TrafficCounter


class RoundProgress:
    """A rich progress bar over rounds, fed by the aggregator's events. It appears once
    the run has begun (the task's metrics declared, or a first event), not while
    worker processes start: a bar frozen at round 0 for seconds would say nothing."""

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
        # its clock starts when the bar appears (_show), not while workers start
        self.task = self.progress.add_task(
            self._label(done + 1), total=rounds + 1, completed=done, detail="", start=False
        )
        self._selected = 0
        self._done = 0
        self._round = done + 1  # the round it waits for, until one opens
        self._last = ""
        self._shown = False

    def declared(self, metrics: Metrics) -> None:
        """The task's declared metrics, once the runtime loaded it: the line shows its
        primary metric, from now on."""
        self.metrics = metrics
        self._show()

    def __enter__(self) -> RoundProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._shown:
            self.progress.stop()

    def _show(self) -> None:
        if not self._shown:
            self._shown = True
            self.progress.start_task(self.task)
            self.progress.start()

    def _label(self, round: int) -> str:
        """``round 3/5``; ``final evaluation`` past the plan's rounds."""
        return "final evaluation" if round > self.rounds else f"round {round}/{self.rounds}"

    def __call__(self, event: Event, traffic: TrafficCounter) -> None:
        self._show()
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
        moved = human_bytes(traffic.sent + traffic.received)
        detail = f"sites {self._done}/{self._selected} · {moved}{self._last}"
        self.progress.update(self.task, description=self._label(self._round), detail=detail)
