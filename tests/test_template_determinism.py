"""On the CPU, one worker and two give bit-identical final weights, for every template
`fedloom init` offers (a template added later is checked without a change here).

Each run is the library's ``simulate`` (real worker processes), its final model written
as ``simulate`` writes ``final.safetensors``: the CLI's start-up and plots would only
add time."""

from __future__ import annotations

from pathlib import Path

import pytest
from workspaces import make_workspace

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.store import save_weights
from fedloom.templates import TEMPLATES

pytestmark = [pytest.mark.slow, pytest.mark.process]

# Each run is kept tiny: two rounds, one epoch, no evaluation (the sites' figures never
# feed the weights). A template too slow even so gets its own
# overrides here (plan keys, as on the command line).
SHRINK = ["rounds=2", "training.epochs=1", "evaluation.each_round=false"]
OVERRIDES: dict[str, list[str]] = {
    "mnist": ["rounds=1", "sites=4"],  # a CNN on 5,000 images: one round of four sites
    # a 3D U-Net: the two smallest hospitals (22 training cases)
    "segmentation": ["sites=[hospital-c, hospital-d]"],
    # a small causal LM with a LoRA adapter: two hospitals, one round
    "llm-lora": ["sites=[cardiology, oncology]", "rounds=1"],
    "cohort": ["rounds=1"],  # an analysis is one round
}


@pytest.mark.parametrize("template", TEMPLATES)
def test_workers_1_and_2_give_bit_identical_final_weights(tmp_path: Path, template: str) -> None:
    ws = make_workspace(tmp_path, template)
    plan = load_plan(ws, [*SHRINK, *OVERRIDES.get(template, []), "evaluation.final=false"])
    finals = []
    for workers in (1, 2):
        result = simulate(ws, plan, SimulationOptions(workers=workers))
        path = tmp_path / f"workers-{workers}.safetensors"
        save_weights(path, result.final_weights)
        finals.append(path.read_bytes())
    assert finals[0] == finals[1]
