"""A site's side of the round, transport-agnostic.

The collaborator asks for work (outbound only), downloads the global model in chunks,
hands it to a *runner* that does the local work on data that never leaves, and streams
the update back. The same class serves a simulated site and a real one: only the
:class:`~fedloom.transport.Connection` and the runner differ.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from fedloom.clock import FaultPoints
from fedloom.errors import FedloomError, UpdateRejected
from fedloom.records import Instruction, InstructionKind, SiteAnswer
from fedloom.transport.base import Connection
from fedloom.transport.messages import (
    Chunk,
    FailureReport,
    PhaseMessage,
    Receipt,
    UpdateHeader,
    assemble,
    iter_chunks,
)
from fedloom.weights import Weights, specs_of

Runner = Callable[[Instruction, Weights], SiteAnswer]


class SitePhase(Protocol):
    """A site's side of one phase of a multi-phase round (secure aggregation's key
    exchange …): it talks to the aggregator's handler of the same phase through
    ``exchange(payload) -> reply``."""

    def run(self, instruction: Instruction, exchange: Callable[[bytes], bytes]) -> None: ...


class Collaborator:
    def __init__(
        self,
        connection: Connection,
        runner: Runner,
        phases: Mapping[str, SitePhase] | None = None,
        *,
        faults: FaultPoints | None = None,
    ) -> None:
        self.connection = connection
        self.runner = runner
        self.phases = dict(phases or {})
        self.faults = faults or FaultPoints()
        self.last_receipt: Receipt | None = None
        self.current: Instruction | None = None  # the instruction being worked on
        self.finished: Instruction | None = None  # the aggregator's last word

    def step(self, timeout: float | None = None) -> bool:
        """Do at most one instruction. False once the federation is finished."""
        instruction = self.connection.get_task(timeout)
        if instruction is None:
            return True
        if instruction.kind is InstructionKind.FINISHED:
            self.finished = instruction
            return False
        self.current = instruction
        try:
            stream = self.connection.download(instruction.round)
            weights = assemble(stream.header.tensors, stream.chunks)
        except UpdateRejected:
            return True  # the round closed before we got the model: ask again

        try:
            self._run_phases(instruction)
            answer = self.runner(instruction, weights)
        except FedloomError as err:
            self._fail(instruction, err.message)
            return True
        except Exception as err:  # the user's task code failed: report, don't die
            self._fail(instruction, traceback.format_exception_only(err)[-1].strip())
            return True
        delta = answer.delta or {}
        header = UpdateHeader(
            round=instruction.round,
            num_samples=answer.num_samples,
            tensors=specs_of(delta),
            metrics=dict(answer.metrics),
            task_id=instruction.task_id,
        )
        chunks = self._sending(instruction.round, iter_chunks(delta))
        self.last_receipt = self.connection.upload(header, chunks)
        self.current = None
        return True

    def _sending(self, round: int, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for index, chunk in enumerate(chunks):
            self.faults.hit(
                "site.upload.chunk", round=round, site=self.connection.site, index=index
            )
            yield chunk

    def run(self, poll_timeout: float | None = None) -> None:
        """Work until the aggregator says the federation is finished."""
        while self.step(poll_timeout):
            pass

    def _run_phases(self, instruction: Instruction) -> None:
        for name in instruction.phases:
            phase = self.phases.get(name)
            if phase is None:
                raise FedloomError(f"this site does not support the round phase {name!r}")

            def exchange(payload: bytes, name: str = name) -> bytes:
                reply = self.connection.exchange(PhaseMessage(instruction.round, name, payload))
                return bytes(reply.payload)

            phase.run(instruction, exchange)

    def _fail(self, instruction: Instruction, reason: str) -> None:
        self.connection.report_failure(
            FailureReport(instruction.round, reason, instruction.task_id)
        )
