"""The round loop, transport-agnostic: the same code runs simulated and real.

:class:`Aggregator` is the aggregator's core. Transports call its service methods
(:meth:`get_instruction`, :meth:`download`, :meth:`upload`, :meth:`report_failure`) with the
site identity they established; :meth:`run` drives the rounds. Nothing here sleeps
or polls: sites waiting for work and the loop waiting for answers block on one
condition, and the deadline comes from an injectable clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedloom.aggregator.attempt import (
    EXPLODED_HINT,
    QUORUM_HINT,
    Attempt,
    exploded_note,
    failure_causes,
    needed_answers,
    summarize,
)
from fedloom.aggregator.board import Board, round_sum
from fedloom.aggregator.config import FederationConfig, Signer, StepHandler
from fedloom.aggregator.ingest import closed_while_streaming
from fedloom.aggregator.probe import Step, last_step
from fedloom.aggregator.service import SiteCalls
from fedloom.aggregator.status import snapshot
from fedloom.compression.codecs import (
    reserved_name_problem,
)
from fedloom.core.clock import Clock, FaultPoints, SystemClock
from fedloom.core.errors import (
    Cancelled,
    QuorumError,
    TaskError,
)
from fedloom.core.events import (
    EventSink,
    Journal,
    Resume,
    RoundClosed,
    RoundOpened,
    SiteAnswered,
)
from fedloom.core.records import (
    CloseReason,
    Ending,
    Failure,
    Instruction,
    InstructionKind,
    MeanSummary,
    RoundRecord,
    Summary,
)
from fedloom.core.rng import select_sites
from fedloom.core.state import FederationState
from fedloom.core.weights import Weights, specs_of
from fedloom.privacy.aggregator import AggregatorPrivacy, spent_after, spent_by_round
from fedloom.strategies.base import Strategy
from fedloom.strategies.scaffold import model_part


class Aggregator(SiteCalls):
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
        exchange_steps: Mapping[str, StepHandler] | None = None,
        spool_dir: Path | None = None,
        journal: Journal | None = None,
        resume: Resume | None = None,
        privacy: AggregatorPrivacy | None = None,
        signer: Signer | None = None,
        evaluate_only: bool = False,
    ) -> None:
        self.strategy = strategy
        if resume is None:
            self.state = FederationState(strategy.init(initial_weights))
            self.history: list[RoundRecord] = []
            # evaluating a given model: no training round, only the final evaluation
            self._next_round = config.rounds + 1 if evaluate_only else 1
            self._attempts: dict[int, int] = {}
        else:
            self.state = resume.state
            self.history = list(resume.history)
            self._next_round = resume.next_round
            self._attempts = dict(resume.attempts)
            if privacy is not None:  # what each finished round spent, from the state
                spent = spent_by_round(self.state.ledger, privacy)
                self.history = with_spent(self.history, spent)
        self._journal = journal
        board = Board(
            config.roster,
            clock or SystemClock(),
            faults or FaultPoints(),
            on_event or (lambda event: None),
            dict(resume.withdrawn) if resume is not None else {},
        )
        super().__init__(board, config, privacy, signer, exchange_steps or {})
        self._spool_dir = spool_dir
        self.stopped_early: str | None = None  # why training ended before the plan's rounds
        self._probing = config.contribution_proxy and privacy is None  # never masked/noised
        self._step: Step | None = None  # the last round's step, while probing
        if config.compression.active:
            problem = reserved_name_problem(specs_of(self.state.weights))
            if problem is not None:
                raise TaskError(problem)

    @property
    def weights(self) -> Weights:
        """The global model (without what a strategy keeps in it: SCAFFOLD's controls)."""
        return model_part(self.state.weights)

    # ---------------------------------------------------------------- the loop

    def run(self) -> list[RoundRecord]:
        """Run every round, then the final evaluation; return the history."""
        ending = Ending.STOPPED  # unless it completes, or is cancelled
        try:
            for rnd in range(self._next_round, self.config.rounds + 1):
                if self._privacy is not None:
                    self.stopped_early = self._privacy.stop_reason(self.state.ledger)
                    if self.stopped_early is not None:
                        break  # cleanly: the final evaluation still runs
                self._train_round(rnd)
            if self.config.final_evaluation:
                self._evaluation_round(self.config.rounds + 1)
            ending = Ending.COMPLETED
        except Cancelled:
            ending = Ending.CANCELLED
            raise
        finally:
            running = self.board.running
            if running is not None and running.secagg is not None:
                running.secagg.abandon("the aggregator stopped")  # release waiting sites
            if ending is not Ending.COMPLETED:
                self._record_stop()
            with self.board.cond:
                # Sites are told the aggregator is done, and whether the federation
                # completed: after a failure or a stop it did not, and the run resumes
                # when the aggregator is started again, unless it was cancelled.
                self.board.ending = ending
                self.board.open = None
                self.board.cond.notify_all()
        return self.history

    def interrupt(self) -> None:
        """Make :meth:`run`, running in another thread, stop as if Ctrl-C had reached it:
        the attempt under way is recorded as stopped and ``run`` raises
        :class:`KeyboardInterrupt` (``simulate --workers 0`` runs the round loop in a
        thread, the tasks in the main thread, which is where Ctrl-C arrives)."""
        with self.board.cond:
            self.board.interrupted = True
            self.board.cond.notify_all()

    def _train_round(self, rnd: int) -> RoundRecord:
        cfg = self.config
        privacy = self._privacy
        selected = tuple(select_sites(list(cfg.roster), cfg.sites_per_round, cfg.seed, rnd))
        asked = self.strategy.configure(rnd, self.state.strategy, cfg.settings)
        instruction = Instruction(
            round=rnd,
            kind=InstructionKind.TRAIN,
            settings=asked.settings,
            config=asked.options,
            exchange_steps=tuple(self._exchange_steps)
            + (privacy.exchange_steps if privacy else ()),
            privacy=privacy.instruction(self.state.ledger) if privacy else {},
        )
        needed = max(needed_answers(len(selected), cfg.min_fraction), self.strategy.min_updates())
        failed: list[Failure] = []
        for _ in range(cfg.max_retries + 1):
            record, opened = self._run_attempt(instruction, selected, needed=needed)
            summary: Summary | None = None
            if record.close_reason is not CloseReason.NO_QUORUM:
                self.board.faults.hit("round.before_aggregate", round=rnd)
                record, summary = summarize(record, opened, self._privacy, self.board.clock)
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
            summary, ledger = privacy.finish(summary, self.state.ledger)
        self.board.faults.hit("round.aggregating", round=rnd)
        strategy, _ = self.strategy.aggregate(rnd, self.state.strategy, summary, record.failures)
        state = FederationState(strategy, self.state.ledger if ledger is None else ledger)
        if ledger is not None:
            record = dataclasses.replace(record, privacy=spent_after(ledger, self._privacy))
        self.board.faults.hit("round.aggregated", round=rnd)
        self._closed(record, state)  # durable before the next round can open
        self._step = last_step(self.state.weights, state.weights) if self._probing else None
        self.state = state
        return record

    def _evaluation_round(self, rnd: int) -> RoundRecord:
        """Every site evaluates the final model; waits for all of them (or the deadline)."""
        instruction = Instruction(
            round=rnd, kind=InstructionKind.EVALUATE, settings=self.config.settings
        )
        record, _ = self._run_attempt(instruction, tuple(sorted(self.config.roster)), needed=0)
        self._closed(record, None)
        return record

    def _closed(self, record: RoundRecord, state: FederationState | None) -> None:
        """Record a closed attempt: in the journal first (with the new state, for a round
        that aggregated), then in the history and the events."""
        if self._journal is not None:
            self._journal.closed(record, state)
        self.board.running = None
        self.history.append(record)
        self.board.emit(RoundClosed(record))

    def _record_stop(self) -> None:
        """The loop is leaving early (interrupted, or failed) with an attempt under way:
        record it as stopped. A process killed outright cannot; a restart does it."""
        running = self.board.running
        if running is None:
            return
        with self.board.cond:
            record = running.record(CloseReason.STOPPED)
        self._closed(record, None)

    def _run_attempt(
        self, instruction: Instruction, selected: tuple[str, ...], *, needed: int
    ) -> tuple[RoundRecord, Attempt]:
        cfg = self.config
        attempt = self._attempts.get(instruction.round, 0) + 1
        self._attempts[instruction.round] = attempt
        instruction = dataclasses.replace(
            instruction, attempt_id=f"{cfg.run_id}/{instruction.round}.{attempt}"
        )
        weights = self.state.weights
        if instruction.kind is InstructionKind.EVALUATE:  # the model alone: nothing comes back
            weights = model_part(weights)
        accumulator, secagg, expected = round_sum(
            self.board,
            instruction,
            selected,
            specs_of(weights),
            self._privacy,
            needs_updates=self.strategy.needs_updates,
            spool_dir=self._spool_dir,
        )
        if self._journal is not None:
            self._journal.opened(instruction, attempt, selected)  # before any site can hear of it
        with self.board.cond:
            opened = Attempt(
                instruction=instruction,
                selected=selected,
                weights=weights,
                accumulator=accumulator,
                deadline=self.board.clock.now() + cfg.round_deadline,
                pending=set(selected),
                expected=expected,
                attempt=attempt,
                secagg=secagg,
                steps={} if secagg is None else secagg.steps,
            )
            if self._step is not None and instruction.kind is InstructionKind.TRAIN:
                opened.reference = self._step
            withdrawn = self.board.settle_withdrawn(opened)
            self.board.open = self.board.running = opened
            self.board.cond.notify_all()
        self.board.emit(RoundOpened(instruction.round, instruction.kind, selected))
        for failure in withdrawn:
            self.board.emit(SiteAnswered(instruction.round, failure.site, False, failure.reason))
        self.board.faults.hit("round.opened", round=instruction.round)
        record, streaming = self.board.wait_and_close(
            opened, needed, cfg.dead_after, cfg.round_deadline
        )
        # Updates still streaming are rolled back now, not waited for: each abort waits
        # only for a chunk being folded, never for the network.
        for contribution in streaming:
            contribution.abort(closed_while_streaming(instruction.round))
        if secagg is not None and record.close_reason is CloseReason.NO_QUORUM:
            secagg.abandon("the round closed without its quorum")
        return record, opened

    def attempt_open(self, attempt_id: str) -> bool:
        """Whether the attempt ``attempt_id`` is open and takes answers (a simulation drops
        the work it queued for an attempt that has closed)."""
        with self.board.cond:
            return (
                self.board.open is not None and self.board.open.instruction.attempt_id == attempt_id
            )

    def snapshot(self) -> dict[str, Any]:
        """The live state, for ``fedloom status``: the round under way and who is where."""
        spent = self._privacy.spent(self.state.ledger) if self._privacy is not None else None
        return snapshot(self.board, self.history, spent)


def with_spent(
    history: list[RoundRecord], spent: list[dict[str, float | str]]
) -> list[RoundRecord]:
    """``history`` with each finished training round given what it had spent."""
    out, left = [], iter(spent)
    for record in history:
        privacy = next(left, None) if record.aggregated else None
        out.append(record if privacy is None else dataclasses.replace(record, privacy=privacy))
    return out
