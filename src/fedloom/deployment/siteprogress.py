"""What a site's collaborator did, as its screen and its log tell it.

:class:`SiteProgress` counts the rounds accepted and failed (the progress line and
the exit summary); :class:`Reporter` says each step, in the log and to whoever
shows the progress; :func:`record_answers` reads what the aggregator made of the
site's last answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedloom.collaborator import StepOutcome

log = logging.getLogger("fedloom.collaborator")


@dataclass
class SiteProgress:
    """What the collaborator did, for its progress line and its exit summary."""

    # training rounds whose update the aggregator accepted (once each: a round that
    # runs again after the aggregator's restart is asked for, and accepted, again)
    accepted: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)  # rounds not answered, or answers refused
    evaluated: bool = False  # the final model was evaluated here
    final_model: Path | None = None  # where this site kept it (STATE/final/<run>.safetensors)
    current: int = 0
    last: str = ""
    # the traceback of the failure ``last`` reports, when the task's own code raised;
    # kept at the site (its log; the screen with --verbose), never sent
    traceback: str = ""

    @property
    def rounds_done(self) -> int:
        return len(self.accepted)

    @property
    def rounds_failed(self) -> int:
        return len(self.failed)


class Reporter:
    """Says one line of the site's progress: kept as ``progress.last`` (with the
    traceback of a task's failure), logged (a warning when ``failed``), and passed to
    ``on_progress``."""

    def __init__(
        self, progress: SiteProgress, on_progress: Callable[[SiteProgress], None] | None
    ) -> None:
        self.progress = progress
        self.on_progress = on_progress

    def __call__(self, line: str, *, failed: bool = False, trace: str = "") -> None:
        progress = self.progress
        progress.last, progress.traceback = line, trace
        (log.warning if failed else log.info)(line + (f"\n{trace}" if trace else ""))
        if self.on_progress is not None:
            self.on_progress(progress)


def record_answers(outcome: StepOutcome, progress: SiteProgress, report: Reporter) -> None:
    """After one step of the collaborator: the round it did not answer (a refused
    model, the policy, the budget), and the aggregator's receipt for the current
    round, each counted in ``progress`` and reported once."""
    refused = outcome.instruction if outcome.failure is not None else None
    if refused is not None and refused.round not in progress.failed:
        # reported to the aggregator already: a refused model, the policy, the budget
        progress.failed.add(refused.round)
        report(f"round {refused.round}: not answered: {outcome.failure}", failed=True)
    receipt = outcome.receipt
    if receipt is None or receipt.round != progress.current:
        return
    if not receipt.accepted:
        progress.failed.add(receipt.round)
        report(f"round {receipt.round}: answer refused: {receipt.reason}", failed=True)
    elif receipt.bytes_received:
        progress.accepted.add(receipt.round)
        progress.failed.discard(receipt.round)  # answered in the end (a retry)
        report(f"round {receipt.round}: update accepted ({receipt.bytes_received} bytes)")
    else:
        progress.evaluated = True
        progress.failed.discard(receipt.round)
        report(f"round {receipt.round}: evaluation of the final model accepted")
