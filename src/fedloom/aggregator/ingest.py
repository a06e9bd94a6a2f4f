"""Upload ingestion: an update's header checked, its chunks decoded and folded, then
committed with the site's result, or rolled back; and the reasons it can be refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fedloom.accumulate import Contribution
from fedloom.aggregator.attempt import Attempt
from fedloom.aggregator.board import Board
from fedloom.aggregator.config import FederationConfig
from fedloom.aggregator.probe import ProbingContribution
from fedloom.compression.codecs import Codec, Compression
from fedloom.compression.stream import UpdateDecoder
from fedloom.core.errors import UpdateRejected
from fedloom.core.records import InstructionKind, SiteResult
from fedloom.core.sanitize import MAX_TEXT_CHARS, check_audit_hash, checked_numbers, printable
from fedloom.transport.messages import Chunk, UpdateHeader

if TYPE_CHECKING:
    from fedloom.privacy.aggregator import AggregatorPrivacy


def closed_while_streaming(round: int) -> str:
    return f"round {round} closed while the update streamed"


def abort_reason(err: BaseException) -> str:
    if isinstance(err, UpdateRejected):
        return err.message
    return f"upload broke off: {type(err).__name__}: {err}"


MAX_LOCAL_STEPS = 10**9  # far beyond any round's optimiser steps


def checked_steps(steps: int) -> int:
    """A site's reported optimiser steps, refused beyond :data:`MAX_LOCAL_STEPS`."""
    if not 0 <= steps <= MAX_LOCAL_STEPS:
        raise UpdateRejected(
            f"local_steps {steps} is out of range (0 to {MAX_LOCAL_STEPS:,})",
            hint="a site reports the optimiser steps its round of training took",
        )
    return int(steps)


def spec_mismatch(got: Iterable[Any], expected: Iterable[Any]) -> str:
    got_l, exp_l = list(got), list(expected)
    if len(got_l) != len(exp_l):
        return f"update has {len(got_l)} tensors, the global model {len(exp_l)}"
    for g, e in zip(got_l, exp_l, strict=True):
        if g != e:
            return (
                f"tensor '{printable(g.name, MAX_TEXT_CHARS)}' {printable(g.dtype, 40)}"
                f"{printable(list(g.shape), MAX_TEXT_CHARS)} does not match the global "
                f"model's {e.name!r} {e.dtype}{list(e.shape)}"
            )
    return "tensor specs differ from the global model"


def receive(
    board: Board,
    config: FederationConfig,
    privacy: AggregatorPrivacy | None,
    site: str,
    opened: Attempt,
    header: UpdateHeader,
    chunks: Iterable[Chunk],
) -> SiteResult | None:
    """Check, fold and record ``site``'s answer; None if the round had already settled
    it. A refused update raises :class:`UpdateRejected`; what was folded is rolled back."""
    check_audit_hash(header.audit_hash)
    training = opened.kind is not InstructionKind.EVALUATE
    numbers = checked_numbers(
        header.num_samples,
        header.metrics,
        max_samples=config.max_samples,
        training=training,
    )
    capped, metrics = numbers.num_samples, numbers.metrics
    steps = checked_steps(header.local_steps)
    result = SiteResult(site, opened.round, capped, numbers.claimed_samples, metrics, steps)
    if not training:
        if header.tensors:
            raise UpdateRejected("an evaluation answer carries no tensors")
        for _ in chunks:
            raise UpdateRejected("an evaluation answer carries no tensors")
        with board.cond:
            return result if board.record(opened, site, result=result) else None
    decoder = update_decoder(config.compression, header, opened)
    board.faults.hit("upload.receiving", round=opened.round, site=site)
    weight = capped if privacy is None else privacy.weight(capped)
    assert opened.accumulator is not None  # noqa: S101 - TRAIN rounds always have one
    with board.cond:
        if board.open is not opened:
            raise UpdateRejected(closed_while_streaming(opened.round))
        contribution = opened.accumulator.begin(site, weight)
        probe = None
        if opened.reference is not None:  # the contribution proxy sees the decoded update
            contribution = probe = ProbingContribution(contribution, opened.reference)
        if decoder is not None:  # the accumulator takes the update decoded
            contribution = decoder.wrap(contribution)
        opened.uploading[site] = contribution  # the round's close aborts it
    try:
        return fold_stream(board, opened, result, contribution, chunks, probe)
    except BaseException as err:
        contribution.abort(abort_reason(err))  # outside the lock: may re-read a spool
        raise


def update_decoder(
    compression: Compression, header: UpdateHeader, opened: Attempt
) -> UpdateDecoder | None:
    """Refuse an update that does not announce the model's tensors, or, under an
    update codec, their encoding; for the latter, the decoder that the update
    streams through before the accumulator checks and folds it."""
    if compression.update is Codec.NONE:
        if tuple(header.tensors) != opened.expected:
            raise UpdateRejected(spec_mismatch(header.tensors, opened.expected))
        return None
    return UpdateDecoder(header.tensors, opened.expected, compression)


def fold_stream(
    board: Board,
    opened: Attempt,
    result: SiteResult,
    contribution: Contribution,
    chunks: Iterable[Chunk],
    probe: ProbingContribution | None = None,
) -> SiteResult:
    """Fold each chunk as it arrives; at the end, commit the update and record the
    site's result together, while the round is still open (with the contribution
    proxy's figures, when ``probe`` folded them); return the result recorded.

    An incomplete update is refused before the lock is taken: its rollback (which
    may re-read a spool of GiBs) must not hold up every other site's calls."""
    site = result.site
    for chunk in chunks:
        contribution.add(chunk.tensor, chunk.offset, chunk.data)
        opened.received[site] = opened.received.get(site, 0) + len(chunk.data)
        board.saw(site)
        board.faults.hit(
            "upload.chunk",
            round=opened.round,
            site=site,
            tensor=chunk.tensor,
            offset=chunk.offset,
        )
    contribution.check_complete()  # the caller rolls back, outside the lock
    with board.cond:  # the close sets `open` under this lock before it reads the sum
        if board.open is not opened:
            raise UpdateRejected(closed_while_streaming(opened.round))
        if site not in opened.pending:  # settled meanwhile (the site reported a failure)
            raise UpdateRejected(f"site {site!r} already answered round {opened.round}")
        contribution.finish()
        if probe is not None:
            figures = probe.metrics()
            result = dataclasses.replace(result, metrics={**result.metrics, **figures})
        board.record(opened, site, result=result)
    return result
