"""The audit log's on-disk format: the record and receipt lines, the canonical JSON a
record's hash covers, and reading the files back.

``STATE/audit.jsonl`` holds one record a line, each chained to the one before by
``prev``; ``STATE/receipts.jsonl`` holds the aggregator's signed receipts. Writing the
log is :class:`~fedloom.privacy.audit.AuditLog`; checking it is
:func:`~fedloom.privacy.audit_verify.verify`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedloom.core.errors import AuditError
from fedloom.core.records import attempt_id_of

AUDIT_LOG = "audit.jsonl"
"""The log's file name in a site's state folder."""
RECEIPTS = "receipts.jsonl"
"""The aggregator's signed receipts, next to the log."""
GENESIS = "0" * 64
"""``prev`` of the first record."""


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
    attempt_id: str
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
            "attempt_id": self.attempt_id,
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
    attempt_id: str
    signature: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "record_hash": self.record_hash,
            "round": self.round,
            "attempt_id": self.attempt_id,
            "signature": self.signature,
        }


def parse_receipt(text: str) -> AuditReceipt | None:
    """The receipt a receipts line holds, or None where it holds none."""
    try:
        obj = json.loads(text)
        receipt = AuditReceipt(
            seq=obj["seq"],
            record_hash=obj["record_hash"],
            round=obj["round"],
            attempt_id=attempt_id_of(obj),
            signature=obj["signature"],
        )
    except (ValueError, TypeError, KeyError):
        return None
    fields = (
        receipt.seq,
        receipt.record_hash,
        receipt.round,
        receipt.attempt_id,
        receipt.signature,
    )
    if not all(isinstance(v, t) for v, t in zip(fields, (int, str, int, str, str), strict=True)):
        return None
    return receipt


def damaged_hint(path: Path) -> str:
    """What to do about the damaged log at ``path``."""
    return (
        f"list every problem with `fedloom audit verify WORKSPACE --name SITE --state "
        f"{path.parent}`; keep {path.name} as evidence and move it aside to start a new log"
    )


# ------------------------------------------------------------------ reading


def read_bytes(path: Path) -> bytes:
    """The file's bytes; a missing or unreadable file is an :class:`AuditError`."""
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise AuditError(
            f"{path} does not exist",
            hint="the site has sent nothing yet, or pass --state with the site's folder",
        ) from err
    except OSError as err:
        raise AuditError(f"cannot read {path}: {err.strerror}") from err


def split_lines(data: bytes) -> list[str]:
    """The lines of a file's bytes, without the newline that ends the last one."""
    if not data:
        return []
    lines = data.decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return lines


def read_lines(path: Path) -> list[str]:
    """The file's lines, as :func:`split_lines` gives them."""
    return split_lines(read_bytes(path))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The log's records as JSON objects, in file order, without checking the chain (that
    is :func:`~fedloom.privacy.audit_verify.verify`). A line that is not a JSON object is
    an :class:`AuditError`."""
    records = []
    for number, line in enumerate(read_lines(path), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise AuditError(
                f"{path}: line {number} is not a JSON record", hint=damaged_hint(Path(path))
            )
        records.append(record)
    return records
