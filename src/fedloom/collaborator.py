"""A site's side of the round, transport-agnostic.

The collaborator asks for work (outbound only), downloads the global model in chunks,
hands it to a *runner* that does the local work on data that never leaves, and streams
the update back. The same class serves a simulated site and a real one: only the
:class:`~fedloom.transport.Connection` and the runner differ.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fedloom.compression.site import SiteCompression
from fedloom.core.clock import FaultPoints
from fedloom.core.errors import FedloomError, TaskError, UpdateRejected
from fedloom.core.records import Instruction, InstructionKind, SiteAnswer
from fedloom.core.sanitize import MAX_SAMPLES_CLAIMED, checked_numbers, shorten
from fedloom.core.weights import Weights, specs_of
from fedloom.privacy.audit import AuditLog, PayloadHasher
from fedloom.privacy.audit_records import AuditReceipt, AuditRecord
from fedloom.privacy.site import SitePrivacy
from fedloom.transport.base import Connection
from fedloom.transport.messages import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    ModelHeader,
    UpdateHeader,
    UploadReceipt,
    assemble,
    iter_chunks,
)

log = logging.getLogger("fedloom.collaborator")

Runner = Callable[[Instruction, Weights], SiteAnswer]
Exchange = Callable[[str, bytes], bytes]


class SiteStep(Protocol):
    """A site's side of one step of a multi-step round (secure aggregation's key
    exchange …): it talks to the aggregator's handler of the same step through
    ``exchange(payload) -> reply``."""

    def run(self, instruction: Instruction, exchange: Callable[[bytes], bytes]) -> None: ...


ModelCheck = Callable[[Instruction, ModelHeader, Weights], None]
"""Checks a downloaded global model before the task sees it (its signature); raises
:class:`~fedloom.core.errors.ModelRejected` to refuse it."""

KeepModel = Callable[[ModelHeader, Weights], None]
"""Keeps the final global model (its header as it arrived, its weights decoded) once it
passed its check, before the task evaluates it."""


@dataclass(frozen=True)
class StepOutcome:
    """What one :meth:`Collaborator.step` did."""

    instruction: Instruction | None = None  # what it worked on; None: no work yet
    receipt: UploadReceipt | None = None  # the aggregator's answer to its upload
    failure: str | None = None  # why it did not answer (told to the aggregator)
    finished: Instruction | None = None  # the aggregator's last word: the federation is over

    @property
    def going_on(self) -> bool:
        """Whether the federation goes on (it did not say it is finished)."""
        return self.finished is None


class Collaborator:
    """A site's side of the round. ``privacy`` clips, noises and masks the update as the
    plan says; ``compression`` then encodes it (and decodes the global model); ``audit``
    records every message that leaves (before it leaves); ``check_model`` verifies each
    global model, as it arrived, before the task loads it; ``keep_final`` keeps the
    final model, the one the federation's last evaluation is of."""

    def __init__(
        self,
        connection: Connection,
        runner: Runner,
        exchange_steps: Mapping[str, SiteStep] | None = None,
        *,
        faults: FaultPoints | None = None,
        privacy: SitePrivacy | None = None,
        audit: AuditLog | None = None,
        check_model: ModelCheck | None = None,
        compression: SiteCompression | None = None,
        keep_final: KeepModel | None = None,
    ) -> None:
        self.connection = connection
        self.runner = runner
        self.exchange_steps = dict(exchange_steps or {})
        self.faults = faults or FaultPoints()
        self.privacy = privacy
        self.audit = audit
        self.check_model = check_model
        self.compression = compression
        self.keep_final = keep_final
        # the instruction of a step under way: a step that raised was working on it
        self.current: Instruction | None = None
        self._last_seq = 0  # the audit record of the last upload

    def step(self, timeout: float | None = None) -> StepOutcome:
        """Do at most one instruction, and say what came of it."""
        instruction = self.connection.get_instruction(timeout)
        if instruction is None:
            return StepOutcome()
        if instruction.kind is InstructionKind.FINISHED:
            return StepOutcome(finished=instruction)
        self.current = instruction
        try:
            if self.privacy is not None:  # keys first: the others wait for this site
                self.privacy.prepare(instruction, self._exchange(instruction))
        except FedloomError as err:
            return self._fail(instruction, err.message)
        try:
            stream = self.connection.download(instruction.round)
            weights = assemble(stream.header.tensors, stream.chunks)
        except UpdateRejected:
            return StepOutcome(instruction)  # the round closed before the model came

        try:
            if self.check_model is not None:
                self.check_model(instruction, stream.header, weights)
            if self.compression is not None:
                weights = self.compression.decode_model(weights)
            if self.keep_final is not None and instruction.kind is InstructionKind.EVALUATE:
                self.keep_final(stream.header, weights)
            self._run_steps(instruction)
            answer = self.runner(instruction, weights)
            header, chunks = self._answer(instruction, answer)
        except FedloomError as err:
            return self._fail(instruction, err.message)
        except Exception as err:  # the user's task code failed: report, don't die
            return self._fail(instruction, traceback.format_exception_only(err)[-1].strip())
        receipt = self.connection.upload(header, chunks)
        if self.compression is not None and answer.delta is not None:
            self.compression.settle(self.connection.site, instruction.round, receipt.accepted)
        if self.audit is not None and receipt.signature and header.audit_hash:
            self.audit.add_receipt(
                AuditReceipt(
                    seq=self._last_seq,
                    record_hash=header.audit_hash,
                    round=instruction.round,
                    attempt_id=instruction.attempt_id,
                    signature=receipt.signature.hex(),
                )
            )
        if receipt.accepted and self.privacy is not None and answer.delta is not None:
            try:
                self.faults.hit(
                    "site.secagg.unmask", round=instruction.round, site=self.connection.site
                )
                self.privacy.complete(instruction, self._exchange(instruction))
            except Exception as err:  # noqa: BLE001 - never fatal: the update is in
                # without this site's shares the others may still unmask the sum
                log.warning("round %d: unmasking: %s", instruction.round, err)
        self.current = None
        return StepOutcome(instruction, receipt=receipt)

    def _answer(
        self, instruction: Instruction, answer: SiteAnswer
    ) -> tuple[UpdateHeader, Iterator[Chunk]]:
        """The header and chunks of ``answer``, protected as the plan says and recorded in
        the audit log before anything is sent."""
        delta = answer.delta or {}
        metrics: dict[str, float] = dict(answer.metrics)
        privacy_record: dict[str, object] = {}
        if self.privacy is not None:
            if answer.delta is not None:
                protected = self.privacy.protect(instruction, delta, answer.num_samples, metrics)
                delta, metrics, privacy_record = (
                    protected.tensors,
                    protected.metrics,
                    protected.privacy,
                )
            else:
                metrics, _ = self.privacy.filter_metrics(metrics)
        try:  # the aggregator would refuse it: say so here, without sending the update
            checked_numbers(
                answer.num_samples,
                metrics,
                max_samples=MAX_SAMPLES_CLAIMED,
                training=answer.delta is not None,
            )
        except UpdateRejected as err:
            raise TaskError(f"the task's answer cannot be sent: {err.message}") from err
        if self.compression is not None and answer.delta is not None:
            site, round = self.connection.site, instruction.round
            delta, params = self.compression.encode(site, round, delta)
            if params:  # the codec in force, beside the privacy parameters
                privacy_record = {**privacy_record, "compression": params}
        specs = specs_of(delta)
        record = self._audit(
            instruction,
            "update" if answer.delta is not None else "evaluation",
            (chunk.data for chunk in iter_chunks(delta)),
            tensors=[(s.name, s.dtype, s.shape) for s in specs],
            metrics=metrics,
            privacy=privacy_record,
        )
        audit_hash = ""
        if record is not None:
            self._last_seq, audit_hash = record.seq, record.hash
        header = UpdateHeader(
            round=instruction.round,
            num_samples=answer.num_samples,
            tensors=specs,
            metrics=metrics,
            attempt_id=instruction.attempt_id,
            audit_hash=audit_hash,
            local_steps=answer.local_steps or 0,
        )
        return header, self._sending(instruction.round, iter_chunks(delta))

    def _exchange(self, instruction: Instruction) -> Callable[[str, bytes], bytes]:
        """Send one step message (recorded in the audit log first); return the reply."""

        def exchange(step: str, payload: bytes) -> bytes:
            self._audit(instruction, f"exchange:{step}", (payload,))
            reply = self.connection.exchange(ExchangeMessage(instruction.round, step, payload))
            return bytes(reply.payload)

        return exchange

    def _audit(
        self,
        instruction: Instruction,
        kind: str,
        parts: Iterable[bytes | memoryview],
        **fields: Any,
    ) -> AuditRecord | None:
        """Record one outbound message of ``kind`` (its bytes are ``parts``) in the audit
        log, before it is sent; None without a log."""
        if self.audit is None:
            return None
        hasher = PayloadHasher()
        for part in parts:
            hasher.update(part)
        return self.audit.append(
            round=instruction.round,
            attempt_id=instruction.attempt_id,
            kind=kind,
            sha256=hasher.hexdigest,
            nbytes=hasher.nbytes,
            **fields,
        )

    def _sending(self, round: int, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for index, chunk in enumerate(chunks):
            self.faults.hit(
                "site.upload.chunk", round=round, site=self.connection.site, index=index
            )
            yield chunk

    def run(self, poll_timeout: float | None = None) -> None:
        """Work until the aggregator says the federation is finished."""
        while self.step(poll_timeout).going_on:
            pass

    def _run_steps(self, instruction: Instruction) -> None:
        own = self.privacy.exchange_steps if self.privacy is not None else ()
        for name in instruction.exchange_steps:
            if name in own:
                continue  # secure aggregation's, run by self.privacy
            step = self.exchange_steps.get(name)
            if step is None:
                raise FedloomError(f"this site does not support the round step {name!r}")

            send = self._exchange(instruction)
            step.run(instruction, functools.partial(send, name))

    def _fail(self, instruction: Instruction, reason: str) -> StepOutcome:
        sent = shorten(reason)  # the aggregator keeps no more of it; a traceback's end stays
        self._audit(instruction, "failure", (sent.encode(),))
        self.connection.report_failure(
            FailureReport(instruction.round, sent, instruction.attempt_id)
        )
        self.current = None
        return StepOutcome(instruction, failure=reason)


def withdraw(connection: Connection, reason: str, *, audit: AuditLog | None = None) -> None:
    """Tell the aggregator this site withdraws from the federation, and why (its data
    does not fit the model …): it stops waiting for the site, whose rounds count it as
    failed at once, until the site says Hello again. The message is audited like any
    other that leaves the site, before it leaves."""
    sent = shorten(reason)
    if audit is not None:
        hasher = PayloadHasher()
        hasher.update(sent.encode())
        audit.append(
            round=0, attempt_id="", kind="withdrawal", sha256=hasher.hexdigest, nbytes=hasher.nbytes
        )
    connection.report_failure(FailureReport(0, sent, withdrawn=True))
