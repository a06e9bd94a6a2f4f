"""The round loop, transport-agnostic: the same code runs simulated and real.

:class:`Aggregator` is the aggregator's core. Transports call its service methods
(:meth:`get_task`, :meth:`download`, :meth:`upload`, :meth:`report_failure`) with the
site identity they established; :meth:`run` drives the rounds. Nothing here sleeps
or polls: sites waiting for work and the loop waiting for answers block on one
condition, and the deadline comes from an injectable clock.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedloom.accumulate import Accumulator, Contribution, make_accumulator
from fedloom.accumulate.masked import MaskedSumAccumulator
from fedloom.aggregator.attempt import (
    EXPLODED_HINT,
    QUORUM_HINT,
    Attempt,
    check_task,
    close_reason_of,
    exploded_note,
    failure_causes,
    needed_answers,
    withdrawn_reason,
)
from fedloom.aggregator.config import FederationConfig, PhaseHandler, Signer
from fedloom.aggregator.ingest import abort_reason, closed_while_streaming, spec_mismatch
from fedloom.aggregator.publish import model_signature, published, sending
from fedloom.compression.codecs import (
    Codec,
    reserved_name_problem,
)
from fedloom.compression.stream import UpdateDecoder
from fedloom.core.clock import Clock, FaultPoints, SystemClock
from fedloom.core.errors import (
    AggregationError,
    Cancelled,
    QuorumError,
    TaskError,
    TransportError,
    UpdateRejected,
)
from fedloom.core.events import (
    EventSink,
    Journal,
    Resume,
    RoundClosed,
    RoundOpened,
    SiteAnswered,
    SiteJoined,
    SiteRejoined,
    SiteWithdrew,
    UploadBroke,
)
from fedloom.core.records import (
    CloseReason,
    Failure,
    FailureKind,
    Instruction,
    InstructionKind,
    MeanSummary,
    RoundRecord,
    SiteResult,
    Summary,
    TrainSettings,
    finished_rounds,
)
from fedloom.core.rng import select_sites
from fedloom.core.sanitize import MAX_TEXT_CHARS, check_audit_hash, checked_numbers, printable
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights, specs_of
from fedloom.privacy.aggregator import STATE_KEY, AggregatorPrivacy, spent_after, spent_by_round
from fedloom.privacy.secagg_server import SecAggRound
from fedloom.privacy.signing import receipt_message
from fedloom.strategies.base import Strategy
from fedloom.transport.base import Cancellation
from fedloom.transport.messages import (
    Chunk,
    FailureReport,
    Heartbeat,
    HeartbeatReply,
    ModelHeader,
    ModelStream,
    PhaseMessage,
    UpdateHeader,
    UploadReceipt,
    iter_chunks,
)


class Aggregator:
    """The aggregator's core: holds the global model, never data.

    ``spool_dir`` is where the rollback spools of streaming updates larger than 64 MiB
    go (each is deleted once its update is committed or rolled back); None means the
    system's temporary folder, which on some systems is memory (tmpfs). Checksums are
    the transport's business (:mod:`fedloom.transport.integrity`), not the core's.
    """

    def __init__(
        self,
        config: FederationConfig,
        strategy: Strategy,
        initial_weights: Weights,
        *,
        clock: Clock | None = None,
        faults: FaultPoints | None = None,
        on_event: EventSink | None = None,
        phases: Mapping[str, PhaseHandler] | None = None,
        spool_dir: Path | None = None,
        journal: Journal | None = None,
        resume: Resume | None = None,
        privacy: AggregatorPrivacy | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.config = config
        self.strategy = strategy
        if resume is None:
            self.state: StrategyState = strategy.init(initial_weights)
            self.history: list[RoundRecord] = []
            self._next_round = 1
            self._attempts: dict[int, int] = {}
        else:
            self.state = resume.state
            self.history = list(resume.history)
            self._next_round = resume.next_round
            self._attempts = dict(resume.attempts)
            if privacy is not None:  # what each finished round spent, from the state
                self.history = with_spent(self.history, spent_by_round(self.state, privacy))
        self._journal = journal
        self.clock = clock or SystemClock()
        self.faults = faults or FaultPoints()
        self._on_event = on_event or (lambda event: None)
        self._cond = threading.Condition()
        self._open: Attempt | None = None
        self._finished = False
        self._completed = False  # run() went through every round
        self._cancelled = False  # run() was cancelled (Cancelled): the run never resumes
        self._interrupted = False  # interrupt(): run() raises KeyboardInterrupt
        self._roster = frozenset(config.roster)
        self._phases = dict(phases or {})
        self.last_seen: dict[str, float] = {}  # site -> clock time of its last call or beat
        # sites that withdrew (why), not waited for until they say Hello again
        self.withdrawn: dict[str, str] = dict(resume.withdrawn) if resume is not None else {}
        self._spool_dir = spool_dir
        self._running: Attempt | None = None  # the attempt under way, open or closing
        self._privacy = privacy
        self._signer = signer
        self.stopped_early: str | None = None  # why training ended before the plan's rounds
        if config.compression.active:
            problem = reserved_name_problem(specs_of(self.state.weights))
            if problem is not None:
                raise TaskError(problem)

    @property
    def weights(self) -> Weights:
        return self.state.weights

    # ---------------------------------------------------------------- the loop

    def run(self) -> list[RoundRecord]:
        """Run every round, then the final evaluation; return the history."""
        completed = cancelled = False
        try:
            for rnd in range(self._next_round, self.config.rounds + 1):
                if self._privacy is not None:
                    self.stopped_early = self._privacy.stop_reason(self.state)
                    if self.stopped_early is not None:
                        break  # cleanly: the final evaluation still runs
                self._train_round(rnd)
            if self.config.final_evaluation:
                self._evaluation_round(self.config.rounds + 1)
            completed = True
        except Cancelled:
            cancelled = True
            raise
        finally:
            running = self._running
            if running is not None and running.secagg is not None:
                running.secagg.abandon("the aggregator stopped")  # release waiting sites
            if not completed:
                self._record_stop()
            with self._cond:
                # Sites are told the aggregator is done, and whether the federation
                # completed: after a failure or a stop it did not, and the run resumes
                # when the aggregator is started again, unless it was cancelled.
                self._finished = True
                self._completed = completed
                self._cancelled = cancelled
                self._open = None
                self._cond.notify_all()
        return self.history

    def interrupt(self) -> None:
        """Make :meth:`run`, running in another thread, stop as if Ctrl-C had reached it:
        the attempt under way is recorded as stopped and ``run`` raises
        :class:`KeyboardInterrupt` (``simulate --workers 0`` runs the round loop in a
        thread, the tasks in the main thread, which is where Ctrl-C arrives)."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def _train_round(self, rnd: int) -> RoundRecord:
        cfg = self.config
        privacy = self._privacy
        selected = tuple(select_sites(list(cfg.roster), cfg.sites_per_round, cfg.seed, rnd))
        extra = dict(self.strategy.configure(rnd, self.state))
        overrides = {k: extra.pop(k) for k in list(extra) if k in TrainSettings.__slots__}
        settings = dataclasses.replace(cfg.settings, **overrides)
        task = Instruction(
            round=rnd,
            kind=InstructionKind.TRAIN,
            settings=settings,
            config=extra,
            phases=tuple(self._phases) + (privacy.phases if privacy else ()),
            privacy=privacy.instruction(self.state) if privacy else {},
        )
        needed = max(needed_answers(len(selected), cfg.min_fraction), self.strategy.min_updates())
        failed: list[Failure] = []
        for _ in range(cfg.max_retries + 1):
            record, opened = self._run_phase(task, selected, needed=needed)
            summary: Summary | None = None
            if record.close_reason is not CloseReason.NO_QUORUM:
                self.faults.hit("round.before_aggregate", round=rnd)
                record, summary = self._summarize(record, opened)
            if summary is not None:
                break
            failed += record.failures
            self._closed(record, None)  # a failed attempt is history too
        else:
            exploded = exploded_note(failed)
            raise QuorumError(
                f"round {rnd}: {exploded}{len(record.results)} of {len(selected)} sites "
                f"answered (attempt {record.attempt}); the round needs {needed}."
                f"{failure_causes(record.failures)}",
                hint=EXPLODED_HINT if exploded else QUORUM_HINT,
            )
        ledger = None
        if privacy is not None and isinstance(summary, MeanSummary):
            summary, ledger = privacy.finish(summary, self.state)
        self.faults.hit("round.aggregating", round=rnd)
        state, _ = self.strategy.aggregate(rnd, self.state, summary, record.failures)
        if ledger is not None:
            state = state.evolve(scalars={**state.scalars, STATE_KEY: ledger})
            record = dataclasses.replace(record, privacy=spent_after(ledger, self._privacy))
        self.faults.hit("round.aggregated", round=rnd)
        self._closed(record, state)  # durable before the next round can open
        self.state = state
        return record

    def _summarize(
        self, record: RoundRecord, opened: Attempt
    ) -> tuple[RoundRecord, Summary | None]:
        """What the round's accumulator folded; under secure aggregation the unmasked
        sum. A sum that cannot be unmasked fails the attempt (no quorum): its record
        says why, and None comes back."""
        secagg = opened.secagg
        if secagg is None:
            assert opened.accumulator is not None  # noqa: S101 - a TRAIN round makes one
            assert not isinstance(opened.accumulator, MaskedSumAccumulator)  # noqa: S101
            return record, opened.accumulator.summary(record.round, record.results)
        assert self._privacy is not None  # noqa: S101 - secure aggregation is privacy's
        try:
            deadline = self.clock.now() + secagg.params.key_seconds
            summary = self._privacy.unmasked_summary(
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

    def _evaluation_round(self, rnd: int) -> RoundRecord:
        """Every site evaluates the final model; waits for all of them (or the deadline)."""
        task = Instruction(round=rnd, kind=InstructionKind.EVALUATE, settings=self.config.settings)
        record, _ = self._run_phase(task, tuple(sorted(self.config.roster)), needed=0)
        self._closed(record, None)
        return record

    def _closed(self, record: RoundRecord, state: StrategyState | None) -> None:
        """Record a closed attempt: in the journal first (with the new state, for a round
        that aggregated), then in the history and the events."""
        if self._journal is not None:
            self._journal.closed(record, state)
        self._running = None
        self.history.append(record)
        self._on_event(RoundClosed(record))

    def _record_stop(self) -> None:
        """The loop is leaving early (interrupted, or failed) with an attempt under way:
        record it as stopped. A process killed outright cannot; a restart does it."""
        running = self._running
        if running is None:
            return
        with self._cond:
            record = running.record(CloseReason.STOPPED)
        self._closed(record, None)

    def _run_phase(
        self, task: Instruction, selected: tuple[str, ...], *, needed: int
    ) -> tuple[RoundRecord, Attempt]:
        cfg = self.config
        attempt = self._attempts.get(task.round, 0) + 1
        self._attempts[task.round] = attempt
        task = dataclasses.replace(task, task_id=f"{cfg.run_id}/{task.round}.{attempt}")
        weights = self.state.weights
        model = specs_of(weights)
        expected = self._privacy.upload_specs(model) if self._privacy is not None else model
        accumulator: Accumulator | MaskedSumAccumulator | None = None
        secagg: SecAggRound | None = None
        if task.kind is InstructionKind.TRAIN and self._privacy is not None:
            secagg = self._privacy.open_secagg(
                task_id=task.task_id,
                round=task.round,
                selected=selected,
                model=model,
                clock=self.clock,
                cond=self._cond,
                in_round=lambda: self._open.pending if self._open is not None else (),
                drop=self._drop_from_secagg,
                spool_dir=self._spool_dir,
            )
        if secagg is not None:
            accumulator, expected = secagg.accumulator, secagg.specs
        elif task.kind is InstructionKind.TRAIN:
            accumulator = make_accumulator(
                expected,
                needs_updates=self.strategy.needs_updates,
                max_sites=len(selected),
                spool_dir=self._spool_dir,
            )
        if self._journal is not None:
            self._journal.opened(task, attempt, selected)  # before any site can hear of it
        with self._cond:
            opened = Attempt(
                task=task,
                selected=selected,
                weights=weights,
                accumulator=accumulator,
                deadline=self.clock.now() + cfg.round_deadline,
                pending=set(selected),
                expected=expected,
                attempt=attempt,
                secagg=secagg,
            )
            withdrawn = self._settle_withdrawn(opened)
            self._open = self._running = opened
            self._cond.notify_all()
        self._on_event(RoundOpened(task.round, task.kind, selected))
        for failure in withdrawn:
            self._on_event(SiteAnswered(task.round, failure.site, False, failure.reason))
        self.faults.hit("round.opened", round=task.round)
        why_closed = (FailureKind.TIMEOUT, "no answer before the round's deadline")
        with self._cond:
            while opened.pending:
                if self._interrupted:
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
                wake = self._drop_silent(opened, now)
                if wake is None:
                    continue  # sites were dropped: look at the round again
                self.faults.hit("round.waiting", round=task.round)
                self.clock.wait(self._cond, min(wake, opened.deadline))
            self._open = None  # no update begins or commits from here on
            streaming = [c for c in opened.uploading.values() if c is not None]
            opened.uploading.clear()
            for site in sorted(opened.pending):
                why = why_closed[1]
                if site in opened.broke:
                    why += f" (its last upload broke off: {opened.broke[site]})"
                opened.failures[site] = Failure(site, task.round, why_closed[0], why)
            opened.pending.clear()  # a late answer changes nothing now
            record = opened.record(close_reason_of(opened, needed))
        # Updates still streaming are rolled back now, not waited for: each abort waits
        # only for a chunk being folded, never for the network.
        for contribution in streaming:
            contribution.abort(closed_while_streaming(task.round))
        if secagg is not None and record.close_reason is CloseReason.NO_QUORUM:
            secagg.abandon("the round closed without its quorum")
        return record, opened

    def _settle_withdrawn(self, opened: Attempt) -> list[Failure]:
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

    def _drop_from_secagg(self, site: str, reason: str) -> None:
        """Settle ``site`` as failed: it missed a step of secure aggregation (the caller,
        the secure aggregation, holds the condition)."""
        opened = self._open
        if opened is None:
            return
        failure = Failure(site, opened.round, FailureKind.DISCONNECTED, reason)
        if self._record(opened, site, failure=failure):
            self._on_event(SiteAnswered(opened.round, site, False, reason))

    def _drop_silent(self, opened: Attempt, now: float) -> float | None:
        """Settle the pending sites silent for ``dead_after`` as disconnected (the caller
        holds the lock); return when the next one would be, or None if any was dropped.

        Only sites this aggregator has heard from count: one never seen (not started
        yet, or still reconnecting after a restart) waits for the deadline. Silence
        counts from the attempt's opening at the earliest, so every attempt (a retry
        too) gives each site ``dead_after`` seconds to speak."""
        dead_after = self.config.dead_after
        if dead_after is None:
            return opened.deadline
        wake = opened.deadline
        dropped: list[str] = []
        for site in sorted(opened.pending):
            seen = self.last_seen.get(site)
            if seen is None:
                continue
            seen = max(seen, opened.deadline - self.config.round_deadline)  # its opening
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
            self._record(
                opened, site, failure=Failure(site, opened.round, FailureKind.DISCONNECTED, reason)
            )
            self._on_event(SiteAnswered(opened.round, site, False, reason))
        return None if dropped else wake

    def task_open(self, task_id: str) -> bool:
        """Whether the attempt ``task_id`` is open and takes answers (a simulation drops
        the work it queued for an attempt that has closed)."""
        with self._cond:
            return self._open is not None and self._open.task.task_id == task_id

    def snapshot(self) -> dict[str, Any]:
        """The live state, for ``fedloom status``: the round under way and who is where."""
        with self._cond:
            now = self.clock.now()
            running = self._running
            current: dict[str, Any] | None = None
            if running is not None:
                current = {
                    "round": running.round,
                    "kind": running.kind.value,
                    "attempt": running.attempt,
                    "task_id": running.task.task_id,
                    "selected": list(running.selected),
                    "answered": sorted(running.results),
                    "failed": {s: f.reason for s, f in sorted(running.failures.items())},
                    "pending": sorted(running.pending),
                    "uploading": {s: running.received.get(s, 0) for s in sorted(running.uploading)},
                    "seconds_left": max(0.0, running.deadline - now),
                }
                if running.secagg is not None:
                    current["secure_aggregation"] = running.secagg.describe()
            return {
                "finished": self._finished,
                "rounds_done": len(finished_rounds(self.history)),
                "current": current,
                "seen_seconds_ago": {s: now - t for s, t in sorted(self.last_seen.items())},
                "withdrawn": dict(sorted(self.withdrawn.items())),
                "privacy": self._privacy.spent(self.state) if self._privacy is not None else None,
            }

    # ------------------------------------------------------ the service methods

    def get_task(
        self, site: str, timeout: float | None, cancel: Cancellation | None = None
    ) -> Instruction | None:
        self._check_site(site)
        deadline = None if timeout is None else self.clock.now() + timeout
        if cancel is not None:  # a caller that hung up frees its thread at once
            cancel.on_cancel(self._wake)
        with self._cond:
            self._saw(site)
            while True:
                if cancel is not None and cancel.cancelled:
                    return None
                if self._finished:
                    return Instruction(
                        round=0,
                        kind=InstructionKind.FINISHED,
                        config={"completed": self._completed, "cancelled": self._cancelled},
                    )
                opened = self._open
                if opened is not None and site in opened.pending:
                    return opened.task
                if deadline is not None and self.clock.now() >= deadline:
                    return None
                self.clock.wait(self._cond, deadline)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def download(self, site: str, round: int) -> ModelStream:
        self._check_site(site)
        with self._cond:
            self._saw(site)
            opened = self._require_open(site, round)
            weights = opened.weights
        self.faults.hit("download.started", round=round, site=site)
        weights = published(opened, weights, self.config.compression.model)
        signature = model_signature(opened, weights, self._signer)
        chunks = sending(self.faults, round, site, iter_chunks(weights))
        header = ModelHeader(round, specs_of(weights), opened.task.task_id, signature)
        return ModelStream(header, chunks)

    def upload(self, site: str, header: UpdateHeader, chunks: Iterable[Chunk]) -> UploadReceipt:
        self._check_site(site)
        with self._cond:
            self._saw(site)
            try:
                opened = self._require_open(site, header.round)
                check_task(header.task_id, opened)
                if site in opened.uploading:
                    raise UpdateRejected(f"site {site!r} is already uploading for this round")
                opened.uploading[site] = None
            except UpdateRejected as err:
                return UploadReceipt(header.round, False, err.message)
        try:
            result = self._receive(site, opened, header, chunks)
        except UpdateRejected as err:
            reason = printable(err.message)  # it may quote what the site sent
            failure = Failure(site, header.round, FailureKind.REJECTED, reason)
            self._settle(opened, site, failure=failure)
            return UploadReceipt(header.round, False, reason)
        except Exception as err:  # the stream broke off: never let it take the round down
            # What was folded is rolled back; the site stays asked for the round and may
            # send its update again (a restarted collaborator does) until the deadline,
            # or until its silence drops it.
            why = printable(f"{type(err).__name__}: {err}", MAX_TEXT_CHARS)
            reason = f"upload broke off: {why}"
            with self._cond:
                opened.broke[site] = why
            self._on_event(UploadBroke(opened.round, site, reason))
            return UploadReceipt(header.round, False, f"{reason}; the update may be sent again")
        finally:  # after the site is settled, so no second upload slips in between
            with self._cond:
                opened.uploading.pop(site, None)
        if result is None:
            return UploadReceipt(
                header.round, False, f"round {header.round} closed before the update"
            )
        self._on_event(SiteAnswered(opened.round, site, True))
        signature = b""
        if self._signer is not None and header.audit_hash:
            signature = self._signer(receipt_message(site, header.task_id, header.audit_hash))
        nbytes = sum(s.nbytes for s in header.tensors)
        return UploadReceipt(header.round, True, "", nbytes, signature)

    def report_failure(self, site: str, report: FailureReport) -> bool:
        """``site`` could not do its task; True if that settled it for the open round.

        A stale report (another round or task, or a site already settled) changes
        nothing and is looked at no further. The reason is kept as
        :func:`~fedloom.core.sanitize.printable` makes it: control characters escaped, at
        most :data:`~fedloom.core.sanitize.MAX_REASON_CHARS` characters.

        A withdrawal (``report.withdrawn``) is never stale: see :meth:`withdraw`; True."""
        self._check_site(site)
        if report.withdrawn:
            self.withdraw(site, report.reason)
            return True
        with self._cond:
            self._saw(site)
            opened = self._open
            if (
                opened is None
                or opened.round != report.round
                or opened.task.task_id != report.task_id
                or site not in opened.pending
            ):
                return False  # a stale report changes nothing
        reason = printable(report.reason) or "(the site gave no reason)"
        return self._settle(
            opened, site, failure=Failure(site, report.round, FailureKind.ERROR, reason)
        )

    def withdraw(self, site: str, reason: str) -> None:
        """``site`` withdraws from the federation, saying why (its data does not fit the
        model …): it is settled as failed in the open round if that waits for it, and in
        every later round that selects it, at once; the quorum rule decides whether the
        others are enough. :meth:`join` (its next Hello) takes it back."""
        self._check_site(site)
        reason = printable(reason) or "(the site gave no reason)"
        with self._cond:
            self._saw(site)
            self.withdrawn[site] = reason
            opened = self._open
        self._on_event(SiteWithdrew(site, reason))
        if opened is not None and site in opened.selected:
            failure = Failure(site, opened.round, FailureKind.WITHDRAWN, withdrawn_reason(reason))
            self._settle(opened, site, failure=failure)  # False: it had answered already

    def join(self, site: str) -> None:
        """A collaborator process of ``site`` said Hello (the gRPC transport calls this):
        a withdrawal it made before no longer holds, and rounds wait for it again."""
        self._check_site(site)
        with self._cond:
            self._saw(site)
            was_withdrawn = self.withdrawn.pop(site, None) is not None
        if was_withdrawn:
            self._on_event(SiteRejoined(site))

    def exchange(self, site: str, message: PhaseMessage) -> PhaseMessage:
        """Hand ``site``'s message to the handler of its phase; return the reply.

        Secure aggregation's phases go to the attempt under way, which checks who may
        speak when (its unmasking follows the upload, when the round is closed)."""
        self._check_site(site)
        if message.phase.startswith("secagg."):
            with self._cond:
                self._saw(site)
                running = self._running  # the attempt under way: open, or unmasking
                secagg = None if running is None else running.secagg
            if secagg is None or secagg.round != message.round:
                raise UpdateRejected(f"no secure aggregation under way for round {message.round}")
            reply = secagg.handle(site, message.phase, bytes(message.payload))
            return PhaseMessage(message.round, message.phase, reply)
        handler = self._phases.get(message.phase)
        if handler is None:
            known = sorted(self._phases) or "none"
            phase = printable(message.phase, MAX_TEXT_CHARS)
            raise UpdateRejected(f"no phase '{phase}' in this federation (phases: {known})")
        with self._cond:
            self._saw(site)
            self._require_open(site, message.round)
        reply = handler(site, message.round, bytes(message.payload))
        return PhaseMessage(message.round, message.phase, reply)

    def heartbeat(self, site: str, beat: Heartbeat) -> HeartbeatReply:
        """``site`` is alive: note when, and say which round is open."""
        self._check_site(site)
        with self._cond:
            self._saw(site)
            opened = self._open
            return HeartbeatReply(0 if opened is None else opened.round, self._finished)

    # ------------------------------------------------------------------ helpers

    def _receive(
        self, site: str, opened: Attempt, header: UpdateHeader, chunks: Iterable[Chunk]
    ) -> SiteResult | None:
        """Check, fold and record ``site``'s answer; None if the round had already
        settled it."""
        check_audit_hash(header.audit_hash)
        training = opened.kind is not InstructionKind.EVALUATE
        numbers = checked_numbers(
            header.num_samples,
            header.metrics,
            max_samples=self.config.max_samples,
            training=training,
        )
        capped, metrics = numbers.num_samples, numbers.metrics
        result = SiteResult(site, opened.round, capped, numbers.claimed_samples, metrics)
        if not training:
            if header.tensors:
                raise UpdateRejected("an evaluation answer carries no tensors")
            for _ in chunks:
                raise UpdateRejected("an evaluation answer carries no tensors")
            with self._cond:
                return result if self._record(opened, site, result=result) else None
        decoder = self._decoder(header, opened)
        self.faults.hit("upload.receiving", round=opened.round, site=site)
        weight = capped if self._privacy is None else self._privacy.weight(capped)
        assert opened.accumulator is not None  # noqa: S101 - TRAIN rounds always have one
        with self._cond:
            if self._open is not opened:
                raise UpdateRejected(closed_while_streaming(opened.round))
            contribution = opened.accumulator.begin(site, weight)
            if decoder is not None:  # the accumulator takes the update decoded
                contribution = decoder.wrap(contribution)
            opened.uploading[site] = contribution  # the round's close aborts it
        try:
            self._fold_stream(opened, result, contribution, chunks)
        except BaseException as err:
            contribution.abort(abort_reason(err))  # outside the lock: may re-read a spool
            raise
        return result

    def _decoder(self, header: UpdateHeader, opened: Attempt) -> UpdateDecoder | None:
        """Refuse an update that does not announce the model's tensors, or, under an
        update codec, their encoding; for the latter, the decoder that the update
        streams through before the accumulator checks and folds it."""
        compression = self.config.compression
        if compression.update is Codec.NONE:
            if tuple(header.tensors) != opened.expected:
                raise UpdateRejected(spec_mismatch(header.tensors, opened.expected))
            return None
        return UpdateDecoder(header.tensors, opened.expected, compression)

    def _fold_stream(
        self,
        opened: Attempt,
        result: SiteResult,
        contribution: Contribution,
        chunks: Iterable[Chunk],
    ) -> None:
        """Fold each chunk as it arrives; at the end, commit the update and record the
        site's result together, while the round is still open.

        An incomplete update is refused before the lock is taken: its rollback (which
        may re-read a spool of GiBs) must not hold up every other site's calls."""
        site = result.site
        for chunk in chunks:
            contribution.add(chunk.tensor, chunk.offset, chunk.data)
            opened.received[site] = opened.received.get(site, 0) + len(chunk.data)
            self._saw(site)
            self.faults.hit(
                "upload.chunk",
                round=opened.round,
                site=site,
                tensor=chunk.tensor,
                offset=chunk.offset,
            )
        contribution.check_complete()  # the caller rolls back, outside the lock
        with self._cond:  # the close sets _open under this lock before it reads the sum
            if self._open is not opened:
                raise UpdateRejected(closed_while_streaming(opened.round))
            if site not in opened.pending:  # settled meanwhile (the site reported a failure)
                raise UpdateRejected(f"site {site!r} already answered round {opened.round}")
            contribution.finish()
            self._record(opened, site, result=result)

    def _settle(
        self,
        opened: Attempt,
        site: str,
        *,
        result: SiteResult | None = None,
        failure: Failure | None = None,
    ) -> bool:
        """Record ``site``'s answer; False if the round had already settled it."""
        with self._cond:
            if not self._record(opened, site, result=result, failure=failure):
                return False
        accepted = result is not None
        self._on_event(
            SiteAnswered(opened.round, site, accepted, "" if failure is None else failure.reason)
        )
        return True

    def _record(
        self,
        opened: Attempt,
        site: str,
        *,
        result: SiteResult | None = None,
        failure: Failure | None = None,
    ) -> bool:
        """:meth:`_settle` without the event; the caller holds ``self._cond``."""
        self._cond.notify_all()
        if site not in opened.pending:
            return False
        opened.pending.discard(site)
        if result is not None:
            opened.results[site] = result
        elif failure is not None:
            opened.failures[site] = failure
        return True

    def _require_open(self, site: str, round: int) -> Attempt:
        opened = self._open
        if opened is None or opened.round != round:
            current = "none" if opened is None else str(opened.round)
            raise UpdateRejected(f"round {round} is not open (open round: {current})")
        if site not in opened.selected:
            raise UpdateRejected(f"site {site!r} was not selected for round {round}")
        if site not in opened.pending:
            raise UpdateRejected(f"site {site!r} already answered round {round}")
        return opened

    def _saw(self, site: str) -> None:
        """``site`` made a call: it is alive now (the caller may hold the lock)."""
        first = site not in self.last_seen
        self.last_seen[site] = self.clock.now()
        if first:
            self._on_event(SiteJoined(site))

    def _check_site(self, site: str) -> None:
        if site not in self._roster:
            raise TransportError(
                f"unknown site {site!r}: not in the plan's roster",
                hint="add the site to `sites` in federation.yaml, or check its name",
            )


def with_spent(
    history: list[RoundRecord], spent: list[dict[str, float | str]]
) -> list[RoundRecord]:
    """``history`` with each finished training round given what it had spent."""
    out, left = [], iter(spent)
    for record in history:
        privacy = next(left, None) if record.aggregated else None
        out.append(record if privacy is None else dataclasses.replace(record, privacy=privacy))
    return out
