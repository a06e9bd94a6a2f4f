"""The board the round loop and the sites' calls share, under one lock: which attempt is
open, who was seen when, who withdrew, whether the run has ended.

The loop writes the attempt; every call of a site reads it and settles that site's answer.
Nothing here sleeps or polls: both sides wait on :attr:`Board.cond`, with deadlines from
the injectable clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from fedloom.accumulate import Accumulator, Contribution, make_accumulator
from fedloom.accumulate.masked import MaskedSumAccumulator
from fedloom.aggregator.attempt import Attempt, close_reason_of, withdrawn_reason
from fedloom.core.clock import Clock, FaultPoints
from fedloom.core.errors import TransportError, UpdateRejected
from fedloom.core.events import EventSink, SiteAnswered, SiteJoined
from fedloom.core.records import (
    Ending,
    Failure,
    FailureKind,
    Instruction,
    InstructionKind,
    RoundRecord,
    SiteResult,
)
from fedloom.core.weights import TensorSpec
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.secagg_server import SecAggRound


class Board:
    """What both sides of a round read and write; :attr:`cond` guards every field."""

    def __init__(
        self,
        roster: Iterable[str],
        clock: Clock,
        faults: FaultPoints,
        on_event: EventSink,
        withdrawn: dict[str, str],
    ) -> None:
        self.cond = threading.Condition()
        self.clock = clock
        self.faults = faults
        self.emit = on_event
        self.roster = frozenset(roster)
        self.open: Attempt | None = None  # the attempt taking answers
        self.running: Attempt | None = None  # the attempt under way, open or closing
        self.ending: Ending | None = None  # how run() ended; None while it runs
        self.interrupted = False  # interrupt(): run() raises KeyboardInterrupt
        self.last_seen: dict[str, float] = {}  # site -> clock time of its last call or beat
        # sites that withdrew (why), not waited for until they say Hello again
        self.withdrawn = withdrawn

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def saw(self, site: str) -> None:
        """``site`` made a call: it is alive now (the caller may hold the lock)."""
        first = site not in self.last_seen
        self.last_seen[site] = self.clock.now()
        if first:
            self.emit(SiteJoined(site))

    def check_site(self, site: str) -> None:
        if site not in self.roster:
            raise TransportError(
                f"unknown site {site!r}: not in the plan's roster",
                hint="add the site to `sites` in federation.yaml, or check its name",
            )

    def require_open(self, site: str, round: int) -> Attempt:
        """The open attempt, if it is ``round``'s and still waits for ``site`` (the caller
        holds the lock)."""
        opened = self.open
        if opened is None or opened.round != round:
            current = "none" if opened is None else str(opened.round)
            raise UpdateRejected(f"round {round} is not open (open round: {current})")
        if site not in opened.selected:
            raise UpdateRejected(f"site {site!r} was not selected for round {round}")
        if site not in opened.pending:
            raise UpdateRejected(f"site {site!r} already answered round {round}")
        return opened

    def settle(
        self,
        opened: Attempt,
        site: str,
        *,
        result: SiteResult | None = None,
        failure: Failure | None = None,
    ) -> bool:
        """Record ``site``'s answer; False if the round had already settled it."""
        with self.cond:
            if not self.record(opened, site, result=result, failure=failure):
                return False
        accepted = result is not None
        self.emit(
            SiteAnswered(opened.round, site, accepted, "" if failure is None else failure.reason)
        )
        return True

    def record(
        self,
        opened: Attempt,
        site: str,
        *,
        result: SiteResult | None = None,
        failure: Failure | None = None,
    ) -> bool:
        """:meth:`settle` without the event; the caller holds :attr:`cond`."""
        self.cond.notify_all()
        if site not in opened.pending:
            return False
        opened.pending.discard(site)
        if result is not None:
            opened.results[site] = result
        elif failure is not None:
            opened.failures[site] = failure
        return True

    def settle_withdrawn(self, opened: Attempt) -> list[Failure]:
        """Settle the selected sites that withdrew as failed, before the attempt opens
        (the caller holds the lock): nobody waits for them, and the quorum rule decides
        whether the others are enough."""
        failures = [
            Failure(site, opened.round, FailureKind.WITHDRAWN, withdrawn_reason(reason))
            for site, reason in sorted(self.withdrawn.items())
            if site in opened.pending
        ]
        for failure in failures:
            opened.pending.discard(failure.site)
            opened.failures[failure.site] = failure
        return failures

    def drop_silent(
        self, opened: Attempt, now: float, dead_after: float | None, round_deadline: float
    ) -> float | None:
        """Settle the pending sites silent for ``dead_after`` as disconnected (the caller
        holds the lock); return when the next one would be, or None if any was dropped.

        Only sites this aggregator has heard from count: one never seen (not started
        yet, or still reconnecting after a restart) waits for the deadline. Silence
        counts from the attempt's opening at the earliest, so every attempt (a retry
        too) gives each site ``dead_after`` seconds to speak."""
        if dead_after is None:
            return opened.deadline
        wake = opened.deadline
        dropped: list[str] = []
        for site in sorted(opened.pending):
            seen = self.last_seen.get(site)
            if seen is None:
                continue
            seen = max(seen, opened.deadline - round_deadline)  # its opening
            if now - seen >= dead_after:
                dropped.append(site)
            else:
                wake = min(wake, seen + dead_after)
        for site in dropped:
            silent = now - self.last_seen[site]
            reason = f"no sign of life for {silent:.1f} s (dead_after)"
            if site in opened.broke:
                reason += f"; its last upload broke off: {opened.broke[site]}"
            # an upload still open stays in `uploading`: the round's close rolls it back
            # outside the lock, or it is refused when it ends (the site is settled)
            self.record(
                opened, site, failure=Failure(site, opened.round, FailureKind.DISCONNECTED, reason)
            )
            self.emit(SiteAnswered(opened.round, site, False, reason))
        return None if dropped else wake

    def drop_from_secagg(self, site: str, reason: str) -> None:
        """Settle ``site`` as failed: it missed a step of secure aggregation (the caller,
        the secure aggregation, holds the condition)."""
        opened = self.open
        if opened is None:
            return
        failure = Failure(site, opened.round, FailureKind.DISCONNECTED, reason)
        if self.record(opened, site, failure=failure):
            self.emit(SiteAnswered(opened.round, site, False, reason))

    def wait_and_close(
        self, opened: Attempt, needed: int, dead_after: float | None, round_deadline: float
    ) -> tuple[RoundRecord, list[Contribution]]:
        """Wait until every site of ``opened`` is settled, the quorum of ``needed`` can no
        longer be reached, or the deadline passes; then close the attempt: the sites still
        pending fail, and its record comes back with the updates still streaming (which
        the caller rolls back outside the lock)."""
        why_closed = (FailureKind.TIMEOUT, "no answer before the round's deadline")
        with self.cond:
            while opened.pending:
                if self.interrupted:
                    raise KeyboardInterrupt
                if len(opened.results) + len(opened.pending) < needed:
                    why_closed = (
                        FailureKind.CANCELLED,
                        "not waited for: the round could no longer reach its quorum",
                    )
                    break
                now = self.clock.now()
                if now >= opened.deadline:
                    break
                wake = self.drop_silent(opened, now, dead_after, round_deadline)
                if wake is None:
                    continue  # sites were dropped: look at the round again
                self.faults.hit("round.waiting", round=opened.round)
                self.clock.wait(self.cond, min(wake, opened.deadline))
            self.open = None  # no update begins or commits from here on
            streaming = [c for c in opened.uploading.values() if c is not None]
            opened.uploading.clear()
            for site in sorted(opened.pending):
                why = why_closed[1]
                if site in opened.broke:
                    why += f" (its last upload broke off: {opened.broke[site]})"
                opened.failures[site] = Failure(site, opened.round, why_closed[0], why)
            opened.pending.clear()  # a late answer changes nothing now
            record = opened.record(close_reason_of(opened, needed))
        return record, streaming


def round_sum(
    board: Board,
    instruction: Instruction,
    selected: tuple[str, ...],
    model: tuple[TensorSpec, ...],
    privacy: AggregatorPrivacy | None,
    *,
    needs_updates: bool,
    spool_dir: Path | None,
) -> tuple[Accumulator | MaskedSumAccumulator | None, SecAggRound | None, tuple[TensorSpec, ...]]:
    """What an attempt folds its updates into, and the tensors each update must announce:
    under secure aggregation the masked sum of its round (which talks to the sites on
    ``board``), else the strategy's accumulator; nothing for an evaluation."""
    expected = privacy.upload_specs(model) if privacy is not None else model
    if instruction.kind is InstructionKind.TRAIN and privacy is not None:
        secagg = privacy.open_secagg(
            attempt_id=instruction.attempt_id,
            round=instruction.round,
            selected=selected,
            model=model,
            clock=board.clock,
            cond=board.cond,
            in_round=lambda: board.open.pending if board.open is not None else (),
            drop=board.drop_from_secagg,
            spool_dir=spool_dir,
        )
        if secagg is not None:
            return secagg.accumulator, secagg, secagg.specs
    if instruction.kind is InstructionKind.TRAIN:
        accumulator = make_accumulator(
            expected, needs_updates=needs_updates, max_sites=len(selected), spool_dir=spool_dir
        )
        return accumulator, None, expected
    return None, None, expected
