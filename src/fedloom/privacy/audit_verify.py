"""Checking an audit log: its hash chain line by line, and the log against the
aggregator's receipts. :func:`verify` lists every problem it finds, each naming its line
and seq; the file format is :mod:`~fedloom.privacy.audit_records`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.core.records import attempt_id_of
from fedloom.privacy.audit_records import (
    GENESIS,
    AuditReceipt,
    parse_receipt,
    read_lines,
    record_hash,
)


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found: how many lines each file holds, and every problem."""

    records: int
    receipts: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Entry:
    """A line that holds an intact record: its content matches its hash."""

    line: int
    seq: int
    hash: str
    prev: str
    round: Any
    attempt_id: Any


def _span(first: int, last: int) -> str:
    return f"record {first} was" if first == last else f"records {first}-{last} were"


def _check_line(number: int, text: str, *, last: bool) -> _Entry | str:
    """The line's record, or the problem with it."""
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return f"line {number}: not a JSON record" + (" (cut off while written?)" if last else "")
    seq, stored, prev = record.get("seq"), record.get("hash"), record.get("prev")
    if (
        not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq < 1
        or not isinstance(stored, str)
        or not isinstance(prev, str)
    ):
        return f"line {number}: not an audit record (its seq, hash or prev is missing)"
    try:
        intact = record_hash(record) == stored
    except ValueError:  # NaN or Infinity written into it
        intact = False
    if not intact:
        return (
            f"line {number} (seq {seq}): its content does not match its hash: the record was edited"
        )
    return _Entry(number, seq, stored, prev, record.get("round"), attempt_id_of(record))


def _check_chain(entries: list[_Entry], holes: list[int]) -> tuple[list[tuple[int, str]], set[int]]:
    """Problems with the order and links of the intact records, and the seqs found
    missing (deleted, or among the unreadable lines)."""
    problems: list[tuple[int, str]] = []
    by_seq: dict[int, _Entry] = {}
    for e in entries:
        first = by_seq.setdefault(e.seq, e)
        if first is not e:
            problems.append(
                (
                    e.line,
                    f"line {e.line} (seq {e.seq}): seq {e.seq} is also at line {first.line}: "
                    "a record was duplicated or replaced",
                )
            )
    present = sorted(by_seq)
    missing: set[int] = set()
    before: _Entry | None = None  # the intact record on the line before, in the file
    for e in entries:
        if before is not None and e.seq < before.seq:
            problems.append(
                (
                    e.line,
                    f"line {e.line} (seq {e.seq}) comes after line {before.line} "
                    f"(seq {before.seq}): the records were reordered",
                )
            )
        if by_seq[e.seq] is e:
            problem = _check_link(e, by_seq, present, holes, before, missing)
            if problem is not None:
                problems.append((e.line, problem))
        before = e
    return problems, missing


def _check_link(
    e: _Entry,
    by_seq: dict[int, _Entry],
    present: list[int],
    holes: list[int],
    before: _Entry | None,
    missing: set[int],
) -> str | None:
    if e.seq == 1:
        if e.prev != GENESIS:
            return (
                f"line {e.line} (seq 1): its prev hash is not the 64 zeros of a first record: "
                "it was rewritten"
            )
        return None
    if e.seq - 1 in by_seq:
        last = by_seq[e.seq - 1]
        if e.prev != last.hash:
            return (
                f"line {e.line} (seq {e.seq}): its prev hash does not match line {last.line} "
                f"(seq {last.seq}): that record was rewritten, or records were removed and "
                "the rest renumbered"
            )
        return None
    lower = max((s for s in present if s < e.seq), default=0)
    first, last_missing = lower + 1, e.seq - 1
    missing.update(range(first, e.seq))
    after_line = by_seq[lower].line if lower else 0
    unreadable = sum(1 for h in holes if after_line < h < e.line)
    neighbours = (before.seq if before is not None else 0) == lower
    if neighbours and unreadable == e.seq - first:
        return None  # the unreadable lines between them, reported already, are the records
    span = _span(first, last_missing)
    cause = "deleted" if not unreadable else "deleted, or are among the unreadable lines"
    if lower == 0 and before is None:
        return f"line {e.line} (seq {e.seq}): the log starts at seq {e.seq}: {span} {cause}"
    if neighbours:
        return f"line {e.line}: seq {e.seq} follows seq {lower}: {span} {cause}"
    return f"line {e.line} (seq {e.seq}): {span} missing before it: {cause}"


def _check_receipts(
    lines: list[str],
    entries: list[_Entry],
    holes: list[int],
    missing: set[int],
    check_signature: Callable[[AuditReceipt], bool] | None,
) -> list[str]:
    problems: list[str] = []
    by_seq: dict[int, _Entry] = {}
    for e in entries:
        by_seq.setdefault(e.seq, e)
    newest = max(by_seq.values(), key=lambda e: e.seq, default=None)
    after = [h for h in holes if newest is None or h > newest.line]
    for number, text in enumerate(lines, 1):
        receipt = parse_receipt(text)
        if receipt is None:
            problems.append(f"receipts line {number}: not a JSON receipt")
            continue
        seq = receipt.seq
        if check_signature is not None and not check_signature(receipt):
            problems.append(f"receipt for seq {seq}: the aggregator's signature does not verify")
            continue
        record = by_seq.get(seq)
        if record is None:
            if newest is None or seq > newest.seq:
                end = (
                    "the log holds no record"
                    if newest is None
                    else f"the log ends at seq {newest.seq}"
                )
                if after:
                    end += f", then {len(after)} unreadable line{'s' * (len(after) != 1)}"
                cause = "were deleted" + (" or damaged" if after else "")
                problems.append(
                    f"receipt for seq {seq} (round {receipt.round}): {end}: "
                    f"the newest records {cause}"
                )
            elif seq not in missing:
                problems.append(f"receipt for seq {seq}: the log has no record {seq}")
        elif record.hash != receipt.record_hash:
            problems.append(
                f"receipt for seq {seq}: the log's record {seq} has another hash: "
                "it was edited or replaced"
            )
        elif (record.round, record.attempt_id) != (receipt.round, receipt.attempt_id):
            problems.append(
                f"receipt for seq {seq}: its round or task differs from record {seq}'s "
                f"(line {record.line}): the receipt was edited"
            )
    return problems


def verify(
    log_path: Path,
    receipts_path: Path,
    check_signature: Callable[[AuditReceipt], bool] | None = None,
) -> VerifyReport:
    """Check the log's hash chain, and the log against the aggregator's receipts.

    Every line must be a record whose content matches its hash, with seq 1, 2, 3 …
    in order and each ``prev`` the hash of the record before it; a receipt must name
    a record the log holds, with the same hash, and (with ``check_signature``) carry
    the aggregator's signature. Every problem found is listed, each naming its line
    and seq. A missing log is an :class:`AuditError`, unless receipts show it existed.
    """
    log_path, receipts_path = Path(log_path), Path(receipts_path)
    receipt_lines = read_lines(receipts_path) if receipts_path.exists() else []
    problems: list[tuple[int, str]] = []
    if not log_path.exists() and receipt_lines:
        lines: list[str] = []
        problems.append((0, f"{log_path} does not exist, yet receipts for its records do"))
    else:
        lines = read_lines(log_path)
    entries: list[_Entry] = []
    holes: list[int] = []
    for number, text in enumerate(lines, 1):
        checked = _check_line(number, text, last=number == len(lines))
        if isinstance(checked, str):
            problems.append((number, checked))
            holes.append(number)
        else:
            entries.append(checked)
    chain_problems, missing = _check_chain(entries, holes)
    problems += chain_problems
    problems.sort(key=lambda p: p[0])  # in file order: the first problem comes first
    found = [p for _, p in problems]
    found += _check_receipts(receipt_lines, entries, holes, missing, check_signature)
    return VerifyReport(records=len(lines), receipts=len(receipt_lines), problems=tuple(found))
