"""The data owner's controls across real processes: secure aggregation and DP over gRPC
with mutual TLS, each site's own policy (found in its state folder), its audit log with
the aggregator's signed receipts, and `fedloom audit verify` catching an edited, a
deleted or a reordered record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspaces import make_workspace, run_cli

SITES = ("site-01", "site-02", "site-03", "site-04")
ALLOWED = ("global_accuracy", "global_loss", "val_samples")

pytestmark = [pytest.mark.slow, pytest.mark.process]


def write_policies(ws: Path) -> None:
    for site in SITES:
        state = ws / "sites" / site
        state.mkdir(parents=True, exist_ok=True)
        (state / "policy.yaml").write_text(
            "version: 1\n"
            "max_rounds: 10\n"
            "dp: {required: true, min_noise_multiplier: 0.5, max_epsilon: 100}\n"
            "secure_aggregation: {required: true}\n"
            f"metrics: {{allowed: [{', '.join(ALLOWED)}]}}\n"
        )


def audit(ws: Path, command: str, site: str) -> tuple[int, str]:
    out = run_cli("audit", command, str(ws), "--name", site)
    return out.returncode, out.stdout + out.stderr


def test_secure_aggregation_dp_policy_and_audit_across_real_processes(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_policies(ws)
    plan = [
        "privacy.secure_aggregation=true",
        "privacy.dp.noise_multiplier=0.8",
        "privacy.dp.clip=0.5",
        "privacy.dp.epsilon_budget=90",
        "training.max_samples=200",
    ]
    out = run_cli(
        "simulate", str(ws), "--sites", "4", "--rounds", "3", "--transport", "grpc",
        "--run-name", "private", "--quiet", *plan,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    run = ws / "runs" / "private"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failures"] == 0
    assert 0 < summary["epsilon"] <= 90
    assert summary["test_accuracy"] > 0.6
    # only the metrics each site's policy lets out reached the aggregator
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        sent = set(row) - {"round", "kind", "attempt", "close_reason", "site", "status",
                           "num_samples", "claimed_samples", "epsilon", "delta", "accountant",
                           "clip", "noise_multiplier"}  # fmt: skip
        assert sent <= set(ALLOWED), sent

    for site in SITES:
        code, text = audit(ws, "verify", site)
        assert code == 0, text
        assert "4 receipts" in text  # 3 masked updates and the final evaluation, all signed
        records = (ws / "sites" / site / "audit.jsonl").read_text().splitlines()
        kinds = [json.loads(r)["kind"] for r in records]
        assert kinds.count("update") == 3 and kinds.count("evaluation") == 1
        assert kinds.count("exchange:secagg.keys") == 3
        update = next(json.loads(r) for r in records if json.loads(r)["kind"] == "update")
        assert update["privacy"]["secure_aggregation"]["bits"] == 32
        assert update["privacy"]["dp"]["noise_multiplier"] == 0.8
        assert {t["dtype"] for t in update["tensors"]} == {"uint32"}  # masked, not floats
        code, text = audit(ws, "show", site)
        assert code == 0 and "update" in text

    log = ws / "sites" / "site-01" / "audit.jsonl"
    original = log.read_text()
    lines = original.splitlines(keepends=True)

    edited = json.loads(lines[2])
    edited["bytes"] += 1
    log.write_text("".join([*lines[:2], json.dumps(edited) + "\n", *lines[3:]]))
    code, text = audit(ws, "verify", "site-01")
    assert code == 13 and "line 3" in text and "edited" in text, text

    log.write_text("".join([*lines[:4], *lines[5:]]))  # one record deleted
    code, text = audit(ws, "verify", "site-01")
    assert code == 13 and "deleted" in text, text

    log.write_text("".join([*lines[:3], lines[4], lines[3], *lines[5:]]))  # two swapped
    code, text = audit(ws, "verify", "site-01")
    assert code == 13 and "line 4" in text, text

    log.write_text("".join(lines[:-2]))  # the newest two records cut off
    code, text = audit(ws, "verify", "site-01")
    assert code == 13 and "receipt" in text and "newest records were deleted" in text, text

    log.write_text(original)
    assert audit(ws, "verify", "site-01")[0] == 0
