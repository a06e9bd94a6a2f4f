"""The chaos run (tests/chaos.py): processes SIGKILLed at named fault points and
restarted; the federation ends bit-identical to an uninterrupted one, no round lost."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from chaos import (
    AGGREGATOR_FAULTS,
    ROUNDS,
    SITE_FAULTS,
    SITES,
    make_chaos_workspace,
    run_chaos,
    run_reference,
)

pytestmark = pytest.mark.process


def test_killed_and_restarted_processes_end_bit_identical_to_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    ws = make_chaos_workspace(tmp_path)
    reference = run_reference(ws)
    result = run_chaos(ws)
    result.reference = reference

    # every planned kill happened, through its fault point
    assert result.aggregator_kills == [spec for spec, _ in AGGREGATOR_FAULTS]
    assert len(result.aggregator_kills) >= 5
    planned_sites = [f"{site} {spec}" for site, specs in SITE_FAULTS.items() for spec in specs]
    assert sorted(result.site_kills) == sorted(planned_sites)
    assert len(result.site_kills) >= 5

    assert result.bit_identical(), "final weights differ from the uninterrupted run"

    # no round lost: each training round finished exactly once, with every site; the
    # attempts the aggregator's death cut short are recorded as stopped, in its rounds
    finished: dict[int, list[str | None]] = defaultdict(list)
    stopped: list[int] = []
    for rnd, _attempt, kind, reason, checkpointed in result.attempts:
        if reason == "stopped":
            stopped.append(rnd)
        elif kind == "train":
            assert checkpointed, (rnd, reason)
            finished[rnd].append(reason)
    assert dict(finished) == {r: ["all_answered"] for r in range(1, ROUNDS + 1)}
    assert stopped == [rnd for _, rnd in AGGREGATOR_FAULTS]
    evaluation = [a for a in result.attempts if a[2] == "evaluate"]
    assert [(a[0], a[3]) for a in evaluation] == [(ROUNDS + 1, "all_answered")]

    # the run folder tells the same story, with every site's metrics of every round
    run = ws / "runs" / "chaos"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    ok: dict[int, set[str]] = defaultdict(set)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["status"] == "ok" and row["close_reason"] == "all_answered":
            ok[row["round"]].add(row["site"])
    assert dict(ok) == {r: set(SITES) for r in range(1, ROUNDS + 2)}
