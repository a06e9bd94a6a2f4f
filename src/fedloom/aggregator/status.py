"""The aggregator's live state as ``fedloom status`` shows it: the round under way, who
answered, who is pending or uploading, when each site was last seen."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedloom.aggregator.board import Board
from fedloom.core.records import RoundRecord, finished_rounds


def snapshot(
    board: Board, history: Sequence[RoundRecord], spent: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What :meth:`~fedloom.aggregator.Aggregator.snapshot` returns; ``spent`` is the
    privacy budget spent so far (None without DP)."""
    with board.cond:
        now = board.clock.now()
        running = board.running
        current: dict[str, Any] | None = None
        if running is not None:
            current = {
                "round": running.round,
                "kind": running.kind.value,
                "attempt": running.attempt,
                "attempt_id": running.instruction.attempt_id,
                "selected": list(running.selected),
                "answered": sorted(running.results),
                "failed": {s: f.reason for s, f in sorted(running.failures.items())},
                "pending": sorted(running.pending),
                "uploading": {s: running.received.get(s, 0) for s in sorted(running.uploading)},
                "seconds_left": max(0.0, running.deadline - now),
            }
            if running.secagg is not None:
                current["secure_aggregation"] = running.secagg.describe()
        return {
            "finished": board.ending is not None,
            "rounds_done": len(finished_rounds(history)),
            "current": current,
            "seen_seconds_ago": {s: now - t for s, t in sorted(board.last_seen.items())},
            "withdrawn": dict(sorted(board.withdrawn.items())),
            "privacy": spent,
        }
