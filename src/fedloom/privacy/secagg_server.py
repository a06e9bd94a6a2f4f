"""Secure aggregation, the aggregator's side of one attempt at a round.

The aggregator relays the sites' signed keys (refusing a site whose keys its own
certificate did not sign), their encrypted shares and their signatures over the key set
they saw, folds the masked updates into a sum
modulo ``2**bits`` (:class:`~fedloom.accumulate.masked.MaskedSumAccumulator`) and, once
the uploads are closed, asks the survivors for the shares that remove the masks:
``b_j`` of every site whose masked update it holds, ``s_d`` of every site that dropped
after the key exchange. It never asks for both of one site, so it learns the sum and
nothing else, as long as it follows the protocol (see :mod:`~fedloom.privacy.secagg` for
the site's side, its checks, and the trust this assumes).

Waiting: each of the two key steps is a barrier that opens when every site of the round
still in it has spoken, or ``key_seconds`` after the step began; sites that missed it
are out of this attempt (their masks are not in anyone's update). The handlers block on
the aggregator's own condition, so a site dropped by the round wakes them.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography import x509

from fedloom.accumulate.masked import MaskedSumAccumulator
from fedloom.core.clock import Clock
from fedloom.core.errors import AggregationError, UpdateRejected
from fedloom.core.sanitize import MAX_TEXT_CHARS, printable
from fedloom.core.weights import TensorSpec
from fedloom.privacy import masking
from fedloom.privacy.quantize import decode, sum_problem, unsigned
from fedloom.privacy.secagg import (
    KEYS,
    REVEAL,
    SHARES,
    STEPS,
    UNMASK,
    dumps,
    loads,
)
from fedloom.privacy.secagg_ledger import Ledger
from fedloom.privacy.secagg_messages import (
    addressed_shares,
    check_attempt,
    public_key,
    revealed_shares,
    shares_message,
    signed_advertisement,
)

AttemptStep = Callable[[str, bytes], bytes]
"""``step(site, payload) -> reply``: one exchange step of the attempt under way."""


class Step(enum.Enum):
    KEYS = 1
    SHARES = 2
    UPLOADS = 3
    UNMASK = 4
    DONE = 5


@dataclass(frozen=True)
class SecAggParameters:
    bits: int
    frac: int
    threshold: float  # fraction of a site's neighbours
    neighbours: int | None
    key_seconds: float
    clip_range: float  # what one coordinate of one site's update may reach, unweighted


class SecAggRound:
    """One attempt at a round under secure aggregation, at the aggregator."""

    def __init__(
        self,
        *,
        attempt_id: str,
        round: int,
        selected: tuple[str, ...],
        specs: tuple[TensorSpec, ...],
        params: SecAggParameters,
        clock: Clock,
        cond: threading.Condition,
        in_round: Callable[[], Iterable[str]],
        drop: Callable[[str, str], None],  # settle a site as failed (caller holds cond)
        spool_dir: Path | None = None,
        site_ca: x509.Certificate | None = None,  # sites' certificates must chain to it
    ) -> None:
        self.attempt_id = attempt_id
        self.round = round
        self.selected = selected
        self.params = params
        self.specs = tuple(TensorSpec(s.name, unsigned(params.bits).name, s.shape) for s in specs)
        self._clock = clock
        self._cond = cond
        self._in_round = in_round  # the round's sites not yet settled (caller holds cond)
        self._drop = drop
        self._site_ca = site_ca
        self.step = Step.KEYS
        self._step_began = clock.now()
        self._book = Ledger()
        self.failure: str | None = None
        self.accumulator = MaskedSumAccumulator(self.specs, admit=self._admit, spool_dir=spool_dir)

    def describe(self) -> dict[str, object]:
        """Where it stands, for ``fedloom status`` (the caller holds the condition)."""
        return {"step": self.step.name.lower(), **self._book.counts(), "failure": self.failure}

    # ---------------------------------------------------------------- handlers

    @property
    def steps(self) -> dict[str, AttemptStep]:
        """The exchange steps this round answers, registered with its attempt."""
        return {step: _taking(self, step) for step in STEPS}

    def handle(self, site: str, step: str, payload: bytes) -> bytes:
        if step == KEYS:
            return self._on_keys(site, loads(payload, "public keys"))
        if step == SHARES:
            return self._on_shares(site, loads(payload, "shares"))
        if step == UNMASK:
            return self._on_unmask(site, loads(payload, "unmask request"))
        if step == REVEAL:
            return self._on_reveal(site, loads(payload, "revealed shares"))
        raise UpdateRejected(
            f"secure aggregation has no step {printable(repr(step), MAX_TEXT_CHARS)}"
        )

    def _on_keys(self, site: str, keys: dict[str, object]) -> bytes:
        check_attempt(keys, self.attempt_id, self.round)
        c, s = public_key(keys.get("c")), public_key(keys.get("s"))
        signed = signed_advertisement(self.attempt_id, site, c, s, keys, self._site_ca)
        with self._cond:
            self._expect(site, Step.KEYS, "its public keys")
            if site in self._book.keys:
                raise UpdateRejected(
                    f"secure aggregation: {site!r} already sent its keys for attempt "
                    f"{self.attempt_id} (a second process of the site?); it sits this round out"
                )
            self._book.keys[site] = {"c": c, "s": s}
            self._book.signed[site] = signed
            self._cond.notify_all()
            self._barrier(Step.KEYS, lambda: set(self._book.keys))
            if site not in self._book.keys or self.step is not Step.SHARES:
                raise UpdateRejected(self._why_out(site, "key exchange"))
            return self._book.key_set_reply(self.params.neighbours, self.params.threshold)

    def _on_shares(self, site: str, shares: dict[str, object]) -> bytes:
        outgoing, signature = shares_message(shares)
        with self._cond:
            self._expect(site, Step.SHARES, "its shares")
            if site in self._book.outbox:
                raise UpdateRejected(f"secure aggregation: {site!r} already sent its shares")
            neighbours = self._book.graph.get(site, ())
            self._book.outbox[site] = addressed_shares(site, outgoing, neighbours)
            self._book.key_set_signatures[site] = signature
            self._cond.notify_all()
            self._barrier(Step.SHARES, lambda: set(self._book.outbox))
            if site not in self._book.outbox or self.step is not Step.UPLOADS:
                raise UpdateRejected(self._why_out(site, "share exchange"))
            return self._book.shares_reply(site)

    def _on_unmask(self, site: str, request: dict[str, object]) -> bytes:
        with self._cond:
            check_attempt(request, self.attempt_id, self.round)
            if site not in self._book.outbox:
                raise UpdateRejected(
                    f"secure aggregation: {site!r} holds no shares of attempt {self.attempt_id}"
                )
            while self.step.value < Step.UNMASK.value and self.failure is None:
                self._clock.wait(self._cond, None)
            if self.failure is not None:
                return dumps({"abandoned": self.failure})
            if site not in self._book.survivors:
                raise UpdateRejected(f"secure aggregation: {site!r} is not among the survivors")
            return dumps(
                {"survivors": list(self._book.survivors), "dropped": list(self._book.dropped)}
            )

    def _on_reveal(self, site: str, shares: dict[str, object]) -> bytes:
        with self._cond:
            check_attempt(shares, self.attempt_id, self.round)
            if self.step is Step.DONE and site in self._book.survivors:
                return dumps({"done": True})  # enough shares came before this site's
            if self.step is not Step.UNMASK or site not in self._book.survivors:
                raise UpdateRejected("secure aggregation: no unmasking under way for this site")
            if site in self._book.revealed:
                raise UpdateRejected(f"secure aggregation: {site!r} already revealed its shares")
            x = sorted(self._book.keys).index(site) + 1  # the point of this site's shares
            allowed = {"b": set(self._book.survivors), "s": set(self._book.dropped)}
            parsed = revealed_shares(site, x, shares, allowed, self._book.graph)
            self._book.store_revealed(site, x, parsed)
            self._cond.notify_all()
            return b"{}"

    # ------------------------------------------------------------- the round

    def _admit(self, site: str) -> None:
        with self._cond:
            if self.step is not Step.UPLOADS or site not in self._book.outbox:
                raise UpdateRejected(
                    f"secure aggregation: {site!r} has no masks agreed for attempt "
                    f"{self.attempt_id} (it missed the key exchange, or the uploads closed)"
                )

    def unmask(self, weights: Mapping[str, int], deadline: float) -> list[np.ndarray]:
        """The weighted sum of the survivors' updates, tensor by tensor (flat float64).

        ``weights`` maps each site whose masked update was folded to its weight. Waits
        for the survivors' shares until ``deadline``; raises :class:`AggregationError`
        when a mask cannot be removed."""
        with self._cond:
            survivors = tuple(sorted(weights))
            if len(survivors) < 2:
                raise self._fail(
                    f"only {len(survivors)} masked update(s) arrived; secure aggregation "
                    "reveals no sum of fewer than 2 sites"
                )
            self._book.survivors = survivors
            self._book.dropped = tuple(sorted(set(self._book.outbox) - set(survivors)))
            self.step = Step.UNMASK
            self._cond.notify_all()
            while not self._book.answered(self.params.threshold):
                if self._clock.now() >= deadline:
                    break
                self._clock.wait(self._cond, deadline)
            missing = self._book.missing(self.params.threshold)
            if missing:
                raise self._fail(
                    "could not unmask the sum: too few shares revealed for "
                    + "; ".join(missing)
                    + f" ({len(self._book.revealed)} of {len(survivors)} survivors answered)"
                )
            self.step = Step.DONE
            b_shares, s_shares = dict(self._book.b), dict(self._book.s)
        p = self.params
        sums = self._book.unmasked(
            self.accumulator.sums(),
            b_shares,
            s_shares,
            threshold=p.threshold,
            attempt_id=self.attempt_id,
            bits=p.bits,
        )
        # refuse a sum no honest sites could have sent: a coordinate beyond what sites of
        # these weights encode from the clip range, compared exactly, in integers (so no
        # honest sum is refused); masks that did not cancel (a site that changed its keys,
        # garbage from a broken site) give uniformly random values, far out of range
        problem = sum_problem(
            sums, weights.values(), clip_range=p.clip_range, frac=p.frac, bits=p.bits
        )
        if problem is not None:
            with self._cond:
                raise self._fail(
                    f"{problem}: the masks did not cancel, or a site sent values it could "
                    "not have encoded"
                )
        return [decode(total, frac=p.frac, bits=p.bits) for total in sums]

    def abandon(self, reason: str) -> None:
        """The attempt ended without unmasking: release every waiting site."""
        with self._cond:
            if self.failure is None and self.step is not Step.DONE:
                self.failure = reason
            self._cond.notify_all()

    # --------------------------------------------------------------- helpers

    def _expect(self, site: str, step: Step, what: str) -> None:
        if self.failure is not None:
            raise UpdateRejected(f"secure aggregation of attempt {self.attempt_id}: {self.failure}")
        if site not in self.selected:
            raise UpdateRejected(f"site {site!r} was not selected for attempt {self.attempt_id}")
        if self.step is not step:
            raise UpdateRejected(
                f"secure aggregation: {site!r} sent {what} too late: the step closed "
                "(the site takes part again in the next round)"
            )

    def _barrier(self, step: Step, spoke: Callable[[], set[str]]) -> None:
        """Wait (holding the condition) until every site still in the round has spoken
        at ``step`` or ``key_seconds`` passed; the first to see it closes the step."""
        deadline = self._step_began + self.params.key_seconds
        while self.step is step and self.failure is None:
            waiting = set(self._in_round()) - spoke()
            if step is Step.SHARES:
                waiting &= set(self._book.keys)
            if not waiting or self._clock.now() >= deadline:
                self._close_step(step, spoke(), waiting)
                break
            self._clock.wait(self._cond, deadline)

    def _close_step(self, step: Step, spoke: set[str], missed: set[str]) -> None:
        if step is Step.KEYS:
            self._book.graph = (
                masking.neighbours(sorted(spoke), self.params.neighbours) if spoke else {}
            )
            self.step = Step.SHARES
        else:
            self.step = Step.UPLOADS
        self._step_began = self._clock.now()
        self._cond.notify_all()
        if len(spoke) < 2:
            self.failure = f"only {len(spoke)} site(s) took part in the key exchange"
        reason = (
            f"missed secure aggregation's {'key' if step is Step.KEYS else 'share'} "
            f"exchange (key_seconds={self.params.key_seconds:g})"
        )
        for site in sorted(missed):
            self._drop(site, reason)  # under the condition, which the aggregator shares

    def _why_out(self, site: str, what: str) -> str:
        if self.failure is not None:
            return f"secure aggregation of attempt {self.attempt_id}: {self.failure}"
        return f"secure aggregation: {site!r} missed the {what} of attempt {self.attempt_id}"

    def _fail(self, reason: str) -> AggregationError:
        self.failure = reason
        self._cond.notify_all()
        return AggregationError(f"secure aggregation of attempt {self.attempt_id}: {reason}")


def _taking(secagg: SecAggRound, step: str) -> AttemptStep:
    """``secagg``'s handler of ``step``, as an exchange step of its attempt."""
    return lambda site, payload: secagg.handle(site, step, payload)
