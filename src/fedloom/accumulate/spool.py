"""The bytes a streaming contribution folded, kept for its rollback.

Pieces stay in memory up to a limit, then go to a temporary file. A piece that cannot
change is kept by reference, with no copy: ``bytes`` (what gRPC delivers), or a view of
a read-only numpy array that owns its memory (what a simulation's worker reply is).
Anything else (a view of an array someone may still write) is copied.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np


class Spool:
    """Append-only pieces of bytes, read back piece by piece, then closed."""

    def __init__(self, memory_limit: int, folder: Path | None = None) -> None:
        self._limit = memory_limit
        self._folder = folder
        self._in_memory = 0
        # each piece: its bytes in memory, or (position, length) in the file
        self._pieces: list[memoryview | tuple[int, int]] = []
        self._file: IO[bytes] | None = None
        self._file_size = 0

    def add(self, raw: memoryview) -> int:
        """Keep ``raw``'s bytes; returns the piece's number."""
        if self._in_memory + len(raw) <= self._limit:
            if _immutable(raw):
                kept = raw
            else:  # numpy copies about 4x faster than bytes(raw)
                kept = np.frombuffer(raw, dtype=np.uint8).copy().data
            self._pieces.append(kept)
            self._in_memory += len(raw)
        else:
            if self._file is None:
                folder = None if self._folder is None else str(self._folder)
                self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - close()
            self._file.seek(self._file_size)
            self._file.write(raw)
            self._pieces.append((self._file_size, len(raw)))
            self._file_size += len(raw)
        return len(self._pieces) - 1

    def read(self, piece: int, step: int) -> Iterator[tuple[int, memoryview | bytes]]:
        """``piece``'s bytes in parts of at most ``step`` bytes, each with its offset."""
        kept = self._pieces[piece]
        if isinstance(kept, memoryview):
            for at in range(0, len(kept), step):
                yield at, kept[at : at + step]
            return
        position, length = kept
        assert self._file is not None  # noqa: S101 - a piece was written to it
        for at in range(0, length, step):
            self._file.seek(position + at)
            yield at, self._file.read(min(step, length - at))

    def length(self, piece: int) -> int:
        """``piece``'s size in bytes."""
        kept = self._pieces[piece]
        return len(kept) if isinstance(kept, memoryview) else kept[1]

    def read_range(self, piece: int, start: int, stop: int) -> memoryview | bytes:
        """Bytes ``[start, stop)`` of ``piece``."""
        kept = self._pieces[piece]
        if isinstance(kept, memoryview):
            return kept[start:stop]
        position, _ = kept
        assert self._file is not None  # noqa: S101 - a piece was written to it
        self._file.seek(position + start)
        return self._file.read(stop - start)

    def close(self) -> None:
        self._pieces.clear()
        self._in_memory = 0
        if self._file is not None:
            self._file.close()
            self._file = None


def _immutable(raw: memoryview) -> bool:
    """True if nobody can write the bytes behind ``raw`` (short of flipping a numpy
    array's flag back, which fedloom never does to an update it sent)."""
    owner: object = raw.obj
    if isinstance(owner, bytes):
        return True
    while isinstance(owner, np.ndarray):
        if owner.flags.writeable:
            return False
        if owner.base is None:
            return True  # a read-only array that owns its memory
        owner = owner.base
    return isinstance(owner, bytes)
