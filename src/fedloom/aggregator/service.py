"""The service methods transports call with the site identity they established: ask for
an instruction, download the model, upload an update, report a failure, withdraw or
rejoin, exchange a step of a multi-step protocol, beat the heart.

Each call reads the :class:`~fedloom.aggregator.board.Board` and settles its own site's
answer there; none of them drives a round (that is the loop's job).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedloom.aggregator.attempt import check_attempt, withdrawn_reason
from fedloom.aggregator.board import Board
from fedloom.aggregator.config import FederationConfig, Signer, StepHandler
from fedloom.aggregator.ingest import receive
from fedloom.aggregator.publish import model_signature, published, sending
from fedloom.core.errors import UpdateRejected
from fedloom.core.events import SiteAnswered, SiteRejoined, SiteWithdrew, UploadBroke
from fedloom.core.records import Failure, FailureKind, Instruction, InstructionKind
from fedloom.core.sanitize import MAX_TEXT_CHARS, printable
from fedloom.core.weights import specs_of
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.signing import receipt_message
from fedloom.transport.base import Cancellation
from fedloom.transport.messages import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    Heartbeat,
    HeartbeatReply,
    ModelHeader,
    ModelStream,
    UpdateHeader,
    UploadReceipt,
    iter_chunks,
)


class SiteCalls:
    """The aggregator's side of every call a site makes
    (:class:`~fedloom.transport.AggregatorService`)."""

    def __init__(
        self,
        board: Board,
        config: FederationConfig,
        privacy: AggregatorPrivacy | None,
        signer: Signer | None,
        exchange_steps: Mapping[str, StepHandler],
    ) -> None:
        self.board = board
        self.config = config
        self._privacy = privacy
        self._signer = signer
        self._exchange_steps = dict(exchange_steps)
        self._attempt_steps = privacy.attempt_steps if privacy is not None else ()

    @property
    def last_seen(self) -> dict[str, float]:
        """Site -> clock time of its last call or beat."""
        return self.board.last_seen

    @property
    def withdrawn(self) -> dict[str, str]:
        """Sites that withdrew (why), not waited for until they say Hello again."""
        return self.board.withdrawn

    def get_instruction(
        self, site: str, timeout: float | None, cancel: Cancellation | None = None
    ) -> Instruction | None:
        board = self.board
        board.check_site(site)
        deadline = None if timeout is None else board.clock.now() + timeout
        if cancel is not None:  # a caller that hung up frees its thread at once
            cancel.on_cancel(board.wake)
        with board.cond:
            board.saw(site)
            while True:
                if cancel is not None and cancel.cancelled:
                    return None
                if board.ending is not None:
                    return Instruction(
                        round=0,
                        kind=InstructionKind.FINISHED,
                        ending=board.ending,
                    )
                opened = board.open
                if opened is not None and site in opened.pending:
                    return opened.instruction
                if deadline is not None and board.clock.now() >= deadline:
                    return None
                board.clock.wait(board.cond, deadline)

    def download(self, site: str, round: int) -> ModelStream:
        board = self.board
        board.check_site(site)
        with board.cond:
            board.saw(site)
            opened = board.require_open(site, round)
            weights = opened.weights
        board.faults.hit("download.started", round=round, site=site)
        weights = published(opened, weights, self.config.compression.model)
        signature = model_signature(opened, weights, self._signer)
        chunks = sending(board.faults, round, site, iter_chunks(weights))
        header = ModelHeader(round, specs_of(weights), opened.instruction.attempt_id, signature)
        return ModelStream(header, chunks)

    def upload(self, site: str, header: UpdateHeader, chunks: Iterable[Chunk]) -> UploadReceipt:
        board = self.board
        board.check_site(site)
        with board.cond:
            board.saw(site)
            try:
                opened = board.require_open(site, header.round)
                check_attempt(header.attempt_id, opened)
                if site in opened.uploading:
                    raise UpdateRejected(f"site {site!r} is already uploading for this round")
                opened.uploading[site] = None
            except UpdateRejected as err:
                return UploadReceipt(header.round, False, err.message)
        try:
            result = receive(board, self.config, self._privacy, site, opened, header, chunks)
        except UpdateRejected as err:
            reason = printable(err.message)  # it may quote what the site sent
            failure = Failure(site, header.round, FailureKind.REJECTED, reason)
            board.settle(opened, site, failure=failure)
            return UploadReceipt(header.round, False, reason)
        except Exception as err:  # the stream broke off: never let it take the round down
            # What was folded is rolled back; the site stays asked for the round and may
            # send its update again (a restarted collaborator does) until the deadline,
            # or until its silence drops it.
            why = printable(f"{type(err).__name__}: {err}", MAX_TEXT_CHARS)
            reason = f"upload broke off: {why}"
            with board.cond:
                opened.broke[site] = why
            board.emit(UploadBroke(opened.round, site, reason))
            again = f"{reason}; the update may be sent again"
            return UploadReceipt(header.round, False, again, resend=True)
        finally:  # after the site is settled, so no second upload slips in between
            with board.cond:
                opened.uploading.pop(site, None)
        if result is None:
            return UploadReceipt(
                header.round, False, f"round {header.round} closed before the update"
            )
        board.emit(SiteAnswered(opened.round, site, True))
        signature = b""
        if self._signer is not None and header.audit_hash:
            signature = self._signer(receipt_message(site, header.attempt_id, header.audit_hash))
        nbytes = sum(s.nbytes for s in header.tensors)
        return UploadReceipt(header.round, True, "", nbytes, signature)

    def report_failure(self, site: str, report: FailureReport) -> bool:
        """``site`` could not do its task; True if that settled it for the open round.

        A stale report (another round or attempt, or a site already settled) changes
        nothing and is looked at no further. The reason is kept as
        :func:`~fedloom.core.sanitize.printable` makes it: control characters escaped, at
        most :data:`~fedloom.core.sanitize.MAX_REASON_CHARS` characters.

        A withdrawal (``report.withdrawn``) is never stale: see :meth:`withdraw`; True."""
        board = self.board
        board.check_site(site)
        if report.withdrawn:
            self.withdraw(site, report.reason)
            return True
        with board.cond:
            board.saw(site)
            opened = board.open
            if (
                opened is None
                or opened.round != report.round
                or opened.instruction.attempt_id != report.attempt_id
                or site not in opened.pending
            ):
                return False  # a stale report changes nothing
        reason = printable(report.reason) or "(the site gave no reason)"
        return board.settle(
            opened, site, failure=Failure(site, report.round, FailureKind.ERROR, reason)
        )

    def withdraw(self, site: str, reason: str) -> None:
        """``site`` withdraws from the federation, saying why (its data does not fit the
        model …): it is settled as failed in the open round if that waits for it, and in
        every later round that selects it, at once; the quorum rule decides whether the
        others are enough. :meth:`join` (its next Hello) takes it back."""
        board = self.board
        board.check_site(site)
        reason = printable(reason) or "(the site gave no reason)"
        with board.cond:
            board.saw(site)
            board.withdrawn[site] = reason
            opened = board.open
        board.emit(SiteWithdrew(site, reason))
        if opened is not None and site in opened.selected:
            failure = Failure(site, opened.round, FailureKind.WITHDRAWN, withdrawn_reason(reason))
            board.settle(opened, site, failure=failure)  # False: it had answered already

    def join(self, site: str) -> None:
        """A collaborator process of ``site`` said Hello (the gRPC transport calls this):
        a withdrawal it made before no longer holds, and rounds wait for it again."""
        board = self.board
        board.check_site(site)
        with board.cond:
            board.saw(site)
            was_withdrawn = board.withdrawn.pop(site, None) is not None
        if was_withdrawn:
            board.emit(SiteRejoined(site))

    def exchange(self, site: str, message: ExchangeMessage) -> ExchangeMessage:
        """Hand ``site``'s message to the handler of its step; return the reply.

        A step the attempt under way registered (its secure aggregation round's) goes to
        that attempt, which checks who may speak when (its unmasking follows the upload,
        when the round is closed); any other to the federation's handler of that name."""
        board = self.board
        board.check_site(site)
        with board.cond:
            board.saw(site)
            running = board.running  # the attempt under way: open, or unmasking
            taken = None if running is None else running.steps.get(message.step)
            under_way = running is not None and running.round == message.round
        step = printable(message.step, MAX_TEXT_CHARS)
        if taken is not None and under_way:
            return ExchangeMessage(message.round, message.step, taken(site, bytes(message.payload)))
        if message.step in self._attempt_steps:
            raise UpdateRejected(f"no attempt takes step '{step}' for round {message.round} now")
        handler = self._exchange_steps.get(message.step)
        if handler is None:
            known = sorted(self._exchange_steps) or "none"
            raise UpdateRejected(f"no step '{step}' in this federation (exchange steps: {known})")
        with board.cond:
            board.saw(site)
            board.require_open(site, message.round)
        reply = handler(site, message.round, bytes(message.payload))
        return ExchangeMessage(message.round, message.step, reply)

    def heartbeat(self, site: str, beat: Heartbeat) -> HeartbeatReply:
        """``site`` is alive: note when, and say which round is open."""
        board = self.board
        board.check_site(site)
        with board.cond:
            board.saw(site)
            opened = board.open
            return HeartbeatReply(0 if opened is None else opened.round, board.ending is not None)
