"""One attempt at a round, and the rules that close it: the quorum, the close reason,
and the causes a missed quorum reports."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedloom.accumulate import Accumulator, Contribution
from fedloom.accumulate.limbs import EXPLODED
from fedloom.accumulate.masked import MaskedSumAccumulator
from fedloom.aggregator.probe import Step
from fedloom.core.clock import Clock
from fedloom.core.errors import AggregationError, UpdateRejected
from fedloom.core.records import (
    CloseReason,
    Failure,
    FailureKind,
    Instruction,
    InstructionKind,
    RoundRecord,
    SiteResult,
    Summary,
)
from fedloom.core.sanitize import MAX_TEXT_CHARS, printable
from fedloom.core.weights import TensorSpec, Weights, specs_of
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.secagg_server import AttemptStep, SecAggRound


@dataclass
class Attempt:
    """One try at a round: who is asked, who answered, why it closed. A round may take
    several (a missed quorum, a restart); each has its own attempt id."""

    instruction: Instruction
    selected: tuple[str, ...]
    weights: Weights
    accumulator: Accumulator | MaskedSumAccumulator | None
    deadline: float
    pending: set[str]
    expected: tuple[TensorSpec, ...] = ()  # what an update must announce
    results: dict[str, SiteResult] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    # sites streaming an answer, with the contribution it is folded into once it begins
    uploading: dict[str, Contribution | None] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)  # bytes of the stream so far
    broke: dict[str, str] = field(default_factory=dict)  # why a site's last upload broke off
    attempt: int = 1
    secagg: SecAggRound | None = None
    # the exchange steps this attempt answers (its secure aggregation round's), by name
    steps: Mapping[str, AttemptStep] = field(default_factory=dict)
    signature: bytes | None = None  # the published model's, made on first download
    published: Weights | None = None  # the model as it travels, under a model codec
    sign_lock: threading.Lock = field(default_factory=threading.Lock)
    # the last step, for the contribution proxy (evaluation.contributions)
    reference: Step | None = None

    @property
    def round(self) -> int:
        return self.instruction.round

    @property
    def kind(self) -> InstructionKind:
        return self.instruction.kind

    def record(self, close_reason: CloseReason) -> RoundRecord:
        """What the attempt did so far, closed for ``close_reason`` (the caller holds
        the aggregator's lock)."""
        return RoundRecord(
            round=self.round,
            kind=self.kind,
            selected=self.selected,
            results=tuple(self.results[s] for s in sorted(self.results)),
            failures=tuple(self.failures[s] for s in sorted(self.failures)),
            close_reason=close_reason,
            attempt=self.attempt,
        )


def needed_answers(selected: int, min_fraction: float) -> int:
    return max(1, math.ceil(selected * min_fraction - 1e-9)) if selected else 0


def close_reason_of(opened: Attempt, needed: int) -> CloseReason:
    answered = len(opened.results)
    if answered == len(opened.selected):
        return CloseReason.ALL_ANSWERED
    if answered < needed:
        return CloseReason.NO_QUORUM
    timed_out = any(f.kind is FailureKind.TIMEOUT for f in opened.failures.values())
    return CloseReason.DEADLINE_QUORUM if timed_out else CloseReason.QUORUM


def withdrawn_reason(reason: str) -> str:
    """The failure recorded for a withdrawn site in a round that selects it."""
    return f"withdrew from the federation: {reason}"


def failure_causes(failures: Iterable[Failure], limit: int = 3) -> str:
    """The distinct reasons sites failed, most frequent first."""
    counts: dict[str, list[str]] = {}
    timeouts: set[str] = set()
    for f in failures:
        counts.setdefault(f.reason, []).append(f.site)
        if f.kind in (FailureKind.TIMEOUT, FailureKind.CANCELLED):
            timeouts.add(f.reason)
    if not counts:
        return ""
    ranked = sorted(counts.items(), key=lambda kv: (kv[0] in timeouts, -len(kv[1]), kv[0]))
    ranked = ranked[:limit]
    lines = [f"\n  {len(sites)} site(s), e.g. {sites[0]}: {reason}" for reason, sites in ranked]
    return " Why:" + "".join(lines)


QUORUM_HINT = "fix what the sites report, or lower deadline.min_fraction"
EXPLODED_HINT = (
    "a model that diverges makes every update grow: a mean strategy (fedavg …) follows any "
    "site whose update is far off, and sites attacking the federation make it diverge; use "
    "a robust strategy (strategy.name=filtered-mean), lower training.lr, or check the sites"
)


def exploded_note(failures: Iterable[Failure]) -> str:
    """``"the updates of site-a, site-b exploded ... "`` when some of ``failures`` (of
    every attempt of a round) refused an update too large to add up, else ``""``."""
    sites = sorted(
        {
            f.site
            for f in failures
            if f.kind is FailureKind.REJECTED and f.reason.startswith(EXPLODED)
        }
    )
    if not sites:
        return ""
    if len(sites) == 1:
        return f"the update of {sites[0]} exploded (too large to add up) and was refused; "
    return f"the updates of {', '.join(sites)} exploded (too large to add up) and were refused; "


def check_attempt(attempt_id: str, opened: Attempt) -> None:
    """Refuse an answer to another opening of the round as stale."""
    now = opened.instruction.attempt_id
    if attempt_id != now:
        answered = printable(attempt_id, MAX_TEXT_CHARS) or "(none)"
        raise UpdateRejected(
            f"stale update: it answers attempt {answered}, but round {opened.round} is now "
            f"attempt {now} (the round was reopened, e.g. after the aggregator restarted); "
            "the site fetches its instruction again"
        )


def summarize(
    record: RoundRecord, opened: Attempt, privacy: AggregatorPrivacy | None, clock: Clock
) -> tuple[RoundRecord, Summary | None]:
    """What the round's accumulator folded; under secure aggregation the unmasked
    sum. A sum that cannot be unmasked fails the attempt (no quorum): its record
    says why, and None comes back."""
    secagg = opened.secagg
    if secagg is None:
        assert opened.accumulator is not None  # noqa: S101 - a TRAIN round makes one
        assert not isinstance(opened.accumulator, MaskedSumAccumulator)  # noqa: S101
        return record, opened.accumulator.summary(record.round, record.results)
    assert privacy is not None  # noqa: S101 - secure aggregation is privacy's
    try:
        deadline = clock.now() + secagg.params.key_seconds
        summary = privacy.unmasked_summary(
            record.round, secagg, specs_of(opened.weights), record.results, deadline
        )
    except AggregationError as err:
        secagg.abandon(err.message)
        cancelled = tuple(
            Failure(r.site, r.round, FailureKind.CANCELLED, err.message) for r in record.results
        )
        failures = tuple(sorted(record.failures + cancelled, key=lambda f: f.site))
        failed = dataclasses.replace(
            record, results=(), failures=failures, close_reason=CloseReason.NO_QUORUM
        )
        return failed, None
    return record, summary
