"""A site's audit log: a tamper-evident record of everything that left it.

One JSON line per outbound message that carries content, in ``STATE/audit.jsonl``.
Each record holds what was sent (tensor names, dtypes and shapes, the sha256 and size
of the bytes, the metrics), the privacy parameters in force, and ``prev``, the hash of
the record before it; its own ``hash`` is the sha256 of its canonical JSON. Editing,
deleting or reordering a record breaks the chain, which
:func:`~fedloom.privacy.audit_verify.verify` reports line by line. Cutting off the newest
records leaves an intact chain, so the aggregator signs a
:class:`~fedloom.privacy.audit_records.AuditReceipt` for each record it receives
(``STATE/receipts.jsonl``): a receipt for a record the log no longer holds gives the cut
away.

This module writes the log; :mod:`~fedloom.privacy.audit_records` is its file format and
:mod:`~fedloom.privacy.audit_verify` checks it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedloom.core.errors import AuditError
from fedloom.core.files import fsync_dir
from fedloom.privacy.audit_records import (
    GENESIS,
    RECEIPTS,
    AuditReceipt,
    AuditRecord,
    canonical_json,
    damaged_hint,
    read_bytes,
    record_hash,
    split_lines,
)

_HEX64 = re.compile(r"[0-9a-f]{64}")


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
        data = read_bytes(self.path)
        lines = split_lines(data)
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
                hint=damaged_hint(self.path),
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
                hint=damaged_hint(self.path),
            )
        self._seq, self._prev = seq, str(stored)
        self._unterminated = not data.endswith(b"\n")

    def append(
        self,
        *,
        round: int,
        attempt_id: str,
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
                attempt_id=attempt_id,
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
            if created:
                fsync_dir(path.parent)
        except OSError as err:
            raise AuditError(
                f"cannot write the audit log {path}: {err.strerror}",
                hint="check that the site's state folder exists and that you may write to it",
            ) from err
