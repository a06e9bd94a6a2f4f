"""What the round loop tells its observers, and what it records durably.

The events (:class:`RoundOpened`, :class:`SiteAnswered` …) go to an event sink as the
loop runs; the :class:`Journal` is where it records each attempt, and :class:`Resume`
is where a restarted aggregator picks up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fedloom.core.records import Instruction, InstructionKind, RoundRecord
from fedloom.core.state import FederationState


@dataclass(frozen=True)
class RoundOpened:
    round: int
    kind: InstructionKind
    selected: tuple[str, ...]


@dataclass(frozen=True)
class SiteAnswered:
    round: int
    site: str
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class RoundClosed:
    record: RoundRecord


@dataclass(frozen=True)
class UploadBroke:
    """A site's upload stream broke off and was rolled back; the site stays asked for
    the round and may send its update again before the deadline."""

    round: int
    site: str
    reason: str


@dataclass(frozen=True)
class SiteJoined:
    """The aggregator heard from ``site`` for the first time (since it started)."""

    site: str


@dataclass(frozen=True)
class SiteWithdrew:
    """``site`` withdrew from the federation, saying why (its data does not fit the
    model …): rounds that select it count it as failed at once, without waiting for it,
    until it says Hello again."""

    site: str
    reason: str


@dataclass(frozen=True)
class SiteRejoined:
    """A withdrawn ``site`` said Hello again (started anew): rounds wait for it again."""

    site: str


Event = (
    RoundOpened
    | SiteAnswered
    | RoundClosed
    | UploadBroke
    | SiteJoined
    | SiteWithdrew
    | SiteRejoined
)
EventSink = Callable[[Event], None]


class Journal(Protocol):
    """Where the round loop records what it does, durably (:mod:`fedloom.store`)."""

    def opened(self, task: Instruction, attempt: int, selected: tuple[str, ...]) -> None:
        """An attempt at a round opened; written before any site hears of it."""
        ...

    def closed(self, record: RoundRecord, state: FederationState | None) -> None:
        """An attempt closed. ``state`` is the federation state after a training round
        that aggregated (the round is finished once this returns), None otherwise."""
        ...


@dataclass(frozen=True)
class Resume:
    """Where a restarted aggregator picks up: the state after round ``next_round - 1``,
    the history so far and how many attempts each round already had (so the attempt ids of
    a rerun round are new)."""

    state: FederationState
    next_round: int
    history: tuple[RoundRecord, ...] = ()
    attempts: Mapping[int, int] = field(default_factory=dict)
    # the sites that had withdrawn, and why: still not waited for after the restart
    withdrawn: Mapping[str, str] = field(default_factory=dict)
