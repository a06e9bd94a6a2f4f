"""Rebuilding the aggregator's state database from its checkpoints, after the damaged
database was moved aside: one run per checkpoint folder, with one finished round per
readable checkpoint (no per-site records survive)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fedloom.core.errors import StateError
from fedloom.store.checkpoint import read_metadata
from fedloom.store.database import stored_path, transaction

CHECKPOINTS = "checkpoints"


def rebuild_from_checkpoints(conn: sqlite3.Connection, state_dir: Path) -> list[str]:
    """Record in ``conn`` what ``state_dir``'s checkpoints say; notes on what was found."""
    notes: list[str] = []
    root = state_dir / CHECKPOINTS
    folders = sorted((p for p in root.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for folder in folders:
        found = []
        for path in folder.glob("round-*.safetensors"):
            try:
                meta = read_metadata(path)
                found.append((int(meta["fedloom.round"]), path, meta))
            except (StateError, KeyError, ValueError):
                continue
        if not found:
            continue
        found.sort(key=lambda f: f[0])  # by round, not by name (round-10000 < round-9999)
        newest, meta = found[-1][0], found[-1][2]
        # training that reached the plan's last round is not resumed (it had finished)
        trained = "fedloom.rounds" in meta and newest >= int(meta["fedloom.rounds"])
        with transaction(conn):
            cur = conn.execute(
                "INSERT INTO runs (run_id, name, run_dir, plan_hash, plan_json, started, "
                "status, error, rebuilt) VALUES (?, ?, ?, ?, '{}', ?, ?, ?, 1)",
                (
                    folder.name,
                    meta.get("fedloom.run_name", folder.name),
                    meta.get("fedloom.run_dir")
                    or f"runs/{meta.get('fedloom.run_name', folder.name)}",
                    meta.get("fedloom.plan_hash", ""),
                    folder.stat().st_mtime,
                    "completed" if trained else "interrupted",
                    "rebuilt from its checkpoints: the state database was damaged",
                ),
            )
            for rnd, path, _ in found:
                conn.execute(
                    "INSERT INTO attempts (run, round, attempt, kind, attempt_id, selected, "
                    "opened, closed, checkpoint) VALUES (?, ?, 1, 'train', '', '[]', ?, ?, ?)",
                    (
                        cur.lastrowid,
                        rnd,
                        path.stat().st_mtime,
                        path.stat().st_mtime,
                        stored_path(path, state_dir),
                    ),
                )
        notes.append(
            f"run {folder.name}: {len(found)} checkpoint(s) found, up to round {newest}"
            + (" (its training had finished)" if trained else "")
        )
    return notes
