"""A site's audit log: a tamper-evident record of everything that left it.

One JSON line per outbound message that carries content, in ``STATE/audit.jsonl``.
Each record holds what was sent (tensor names, dtypes and shapes, the sha256 and size
of the bytes, the metrics), the privacy parameters in force, and ``prev``, the hash of
the record before it; its own ``hash`` is the sha256 of its canonical JSON. Editing,
deleting or reordering a record breaks the chain, which :func:`verify` reports line by
line. Cutting off the newest records leaves an intact chain, so the aggregator signs a
:class:`AuditReceipt` for each record it receives (``STATE/receipts.jsonl``): a receipt for
a record the log no longer holds gives the cut away.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedloom.core.errors import AuditError

AUDIT_LOG = "audit.jsonl"
"""The log's file name in a site's state folder."""
RECEIPTS = "receipts.jsonl"
"""The aggregator's signed receipts, next to the log."""
GENESIS = "0" * 64
"""``prev`` of the first record."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: sorted keys, no spaces, ASCII only."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 hex of ``record``'s canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One message that left the site. ``nbytes`` is the record's ``bytes`` field; a
    metric that is not finite is kept as the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"`` (JSON has no such numbers)."""

    seq: int
    time: str
    round: int
    task_id: str
    kind: str
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]
    sha256: str
    nbytes: int
    metrics: Mapping[str, float | str]
    privacy: Mapping[str, Any]
    prev: str
    hash: str

    def as_json(self) -> dict[str, Any]:
        """The record as the JSON object its line holds."""
        return {
            "seq": self.seq,
            "time": self.time,
            "round": self.round,
            "task_id": self.task_id,
            "kind": self.kind,
            "tensors": [
                {"name": name, "dtype": dtype, "shape": list(shape)}
                for name, dtype, shape in self.tensors
            ],
            "sha256": self.sha256,
            "bytes": self.nbytes,
            "metrics": dict(self.metrics),
            "privacy": dict(self.privacy),
            "prev": self.prev,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class AuditReceipt:
    """The aggregator's acknowledgement of record ``seq``: ``signature`` (hex) is its
    signature over :func:`fedloom.privacy.signing.receipt_message` of the site, the
    task and ``record_hash``."""

    seq: int
    record_hash: str
    round: int
    task_id: str
    signature: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "record_hash": self.record_hash,
            "round": self.round,
            "task_id": self.task_id,
            "signature": self.signature,
        }


class PayloadHasher:
    """sha256 and byte count of a payload sent in parts, fed as the parts stream out."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._nbytes = 0

    def update(self, part: bytes | bytearray | memoryview) -> None:
        view = memoryview(part)
        self._sha.update(view)
        self._nbytes += view.nbytes

    @property
    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    @property
    def nbytes(self) -> int:
        return self._nbytes


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _metric(value: float) -> float | str:
    value = float(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _damaged_hint(path: Path) -> str:
    return (
        f"list every problem with `fedloom audit verify WORKSPACE --name SITE --state "
        f"{path.parent}`; keep {path.name} as evidence and move it aside to start a new log"
    )


class AuditLog:
    """Appends hash-chained records to ``path`` (created 0600, with its folder).

    Opening reads the last record to continue the chain, and refuses a log whose last
    line is not a record that verifies: appending to it would hide the damage.
    Thread-safe; one process per log.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.receipts_path = self.path.with_name(RECEIPTS)
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        self._unterminated = False  # the last record lacks its newline: write one first
        if self.path.exists():
            self._resume()

    def _resume(self) -> None:
        data = _read(self.path)
        lines = _split(data)
        if not lines:
            return
        last = lines[-1]
        try:
            record = json.loads(last)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise AuditError(
                f"the audit log {self.path} is damaged: its last line ({len(lines)}) is not a JSON "
                "record (cut off while written?)",
                hint=_damaged_hint(self.path),
            )
        seq = record.get("seq")
        stored = record.get("hash")
        try:
            intact = stored == record_hash(record)
        except (TypeError, ValueError):
            intact = False
        if not intact or not isinstance(seq, int) or isinstance(seq, bool):
            raise AuditError(
                f"the audit log {self.path} is damaged: its last record (line {len(lines)}, "
                f"seq {seq}) does not match its hash",
                hint=_damaged_hint(self.path),
            )
        self._seq, self._prev = seq, str(stored)
        self._unterminated = not data.endswith(b"\n")

    def append(
        self,
        *,
        round: int,
        task_id: str,
        kind: str,
        tensors: Sequence[tuple[str, str, tuple[int, ...]]] = (),
        sha256: str,
        nbytes: int,
        metrics: Mapping[str, float] | None = None,
        privacy: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Record one outbound message; returns the record once it is on disk."""
        if not _HEX64.fullmatch(sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, not {sha256!r}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        entries = tuple(
            (str(name), str(dtype), tuple(int(d) for d in shape)) for name, dtype, shape in tensors
        )
        sent = {str(k): _metric(v) for k, v in (metrics or {}).items()}
        params = dict(privacy or {})
        try:
            canonical_json(params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"the privacy parameters are not plain JSON: {err}") from err
        with self._lock:
            record = AuditRecord(
                seq=self._seq + 1,
                time=_utc_now(),
                round=int(round),
                task_id=task_id,
                kind=kind,
                tensors=entries,
                sha256=sha256,
                nbytes=int(nbytes),
                metrics=sent,
                privacy=params,
                prev=self._prev,
                hash="",
            )
            digest = record_hash(record.as_json())
            record = replace(record, hash=digest)
            self._write(self.path, record.as_json(), newline_first=self._unterminated)
            self._unterminated = False
            self._seq, self._prev = record.seq, digest
        return record

    def add_receipt(self, receipt: AuditReceipt) -> None:
        """Keep the aggregator's receipt for one of this log's records."""
        with self._lock:
            self._write(self.receipts_path, receipt.as_json())

    def _write(self, path: Path, obj: Mapping[str, Any], *, newline_first: bool = False) -> None:
        line = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        data = (b"\n" if newline_first else b"") + line.encode("ascii") + b"\n"
        created = not path.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if created and os.name == "posix":
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as err:
            raise AuditError(
                f"cannot write the audit log {path}: {err.strerror}",
                hint="check that the site's state folder exists and that you may write to it",
            ) from err


# ------------------------------------------------------------------ reading


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise AuditError(
            f"{path} does not exist",
            hint="the site has sent nothing yet, or pass --state with the site's folder",
        ) from err
    except OSError as err:
        raise AuditError(f"cannot read {path}: {err.strerror}") from err


def _split(data: bytes) -> list[str]:
    """The lines of a file's bytes, without the newline that ends the last one."""
    if not data:
        return []
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return lines


def _lines(path: Path) -> list[str]:
    return _split(_read(path))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The log's records as JSON objects, in file order, without checking the chain (that
    is :func:`verify`). A line that is not a JSON object is an :class:`AuditError`."""
    records = []
    for number, line in enumerate(_lines(path), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise AuditError(
                f"{path}: line {number} is not a JSON record", hint=_damaged_hint(Path(path))
            )
        records.append(record)
    return records


# ------------------------------------------------------------------ verifying


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
    task_id: Any


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
    return _Entry(number, seq, stored, prev, record.get("round"), record.get("task_id"))


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


def _parse_receipt(text: str) -> AuditReceipt | None:
    try:
        obj = json.loads(text)
        receipt = AuditReceipt(
            seq=obj["seq"],
            record_hash=obj["record_hash"],
            round=obj["round"],
            task_id=obj["task_id"],
            signature=obj["signature"],
        )
    except (ValueError, TypeError, KeyError):
        return None
    fields = (receipt.seq, receipt.record_hash, receipt.round, receipt.task_id, receipt.signature)
    if not all(isinstance(v, t) for v, t in zip(fields, (int, str, int, str, str), strict=True)):
        return None
    return receipt


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
        receipt = _parse_receipt(text)
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
        elif (record.round, record.task_id) != (receipt.round, receipt.task_id):
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
    receipt_lines = _lines(receipts_path) if receipts_path.exists() else []
    problems: list[tuple[int, str]] = []
    if not log_path.exists() and receipt_lines:
        lines: list[str] = []
        problems.append((0, f"{log_path} does not exist, yet receipts for its records do"))
    else:
        lines = _lines(log_path)
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
