"""The llm-lora template as a user runs it: `fedloom init` writes a small causal LM with
save_pretrained and each hospital's notes; the federation fine-tunes a LoRA adapter on
them. Only the adapter crosses the wire, secure aggregation ends where plain FedAvg
does, and a site whose copy of the base model differs by one byte is refused."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_deploy import kill_leftovers, start_aggregator, start_site
from workspaces import run_cli

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.pki import provision

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = [pytest.mark.slow, pytest.mark.process]

SMALL = ["sites=[cardiology, oncology]", "rounds=2"]
QUIET = "evaluation.each_round=false"  # the runs that only compare the test set's figure


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("lm") / "lm"
    done = run_cli("init", str(ws), "--template", "llm-lora")
    assert done.returncode == 0, done.stderr
    assert "wrote the base model models/tiny-lm" in done.stdout, done.stdout
    assert (ws / "models" / "tiny-lm" / "model.safetensors").is_file()
    notes = (ws / "data" / "oncology" / "notes.txt").read_text().splitlines()
    assert notes and all(n.startswith("Oncology: ") for n in notes)  # non-IID by site
    return ws


def test_the_adapter_alone_travels_lowers_the_perplexity_and_takes_secure_aggregation_and_dp(
    workspace: Path,
) -> None:
    plain = simulate(workspace, load_plan(workspace, SMALL), SimulationOptions(workers=0))
    per_round = [
        np.mean([r.metrics["global_perplexity"] for r in record.results])
        for record in plain.history
        if record.results and "global_perplexity" in record.results[0].metrics
    ]
    # the sites' held-out perplexity of the model each round starts from (rounds 1, 2),
    # then of the final model (the final evaluation)
    assert len(per_round) == 3 and all(b < a for a, b in itertools.pairwise(per_round))
    assert plain.test_metrics["perplexity"] < per_round[0]
    names = list(plain.final_weights)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    federated = sum(a.nbytes for a in plain.final_weights.values())
    assert plain.model_bytes is not None and federated < 0.03 * plain.model_bytes
    # every round sends the adapter to each site and takes one back, and nothing else
    rounds = len(plain.history)
    assert plain.bytes_sent == rounds * 2 * federated

    secure = simulate(
        workspace,
        load_plan(workspace, [*SMALL, QUIET, "privacy.secure_aggregation=true"]),
        SimulationOptions(workers=0),
    )
    # the default 32-bit ring's fixed point rounds each masked value (here by about 1e-7),
    # and AdamW's m / sqrt(v) step amplifies it in later rounds: 0.009 % here, 0.57 % on
    # the full template (docs/privacy.md); the 64-bit ring ends bit-identical to plain
    # FedAvg on this workload
    assert secure.test_metrics["perplexity"] == pytest.approx(
        plain.test_metrics["perplexity"], rel=0.02
    )

    # DP-FedAvg on the adapter: clipped, noised, accounted; still only the adapter moves
    dp = "privacy.dp={noise_multiplier: 0.3, clip: 0.5, delta: 1.0e-5}"
    private = simulate(
        workspace, load_plan(workspace, [*SMALL, QUIET, dp]), SimulationOptions(workers=0)
    )
    assert list(private.final_weights) == names
    assert private.bytes_sent == plain.bytes_sent
    spent = [r.privacy.get("epsilon") for r in private.history if r.aggregated]
    assert len(spent) == 2 and all(e is not None and e > 0 for e in spent)
    assert np.isfinite(private.test_metrics["perplexity"])


def test_a_site_whose_base_model_differs_by_one_byte_is_refused_naming_the_base(
    workspace: Path, tmp_path: Path
) -> None:
    ws = tmp_path / "lm"
    shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("runs", "sites"))
    plan = ["sites=[cardiology, oncology]", "rounds=1"]
    provision(ws, ["cardiology", "oncology"])
    other = tmp_path / "oncology-copy"  # the second hospital's own copy of the workspace
    shutil.copytree(ws, other)
    weights = other / "models" / "tiny-lm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    shown = run_cli("plan", "show", str(other))
    assert shown.returncode == 0 and "base model" in shown.stdout, shown.stderr
    aggregator, port = start_aggregator(ws, plan, "refused")
    try:
        site = start_site(other, plan, "oncology", port)  # from its own copy
        screen = site.communicate(timeout=300)[0].decode()
        assert site.returncode != 0, screen
        assert "plan hash" in screen and "the base model models/tiny-lm" in screen, screen
    finally:
        kill_leftovers(aggregator)
        aggregator.communicate(timeout=60)
    log = (ws / "aggregator" / "aggregator.log").read_text()
    assert "plan hash of 'oncology'" in log, log
