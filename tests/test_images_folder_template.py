"""The images-folder template: PNG files on disk, one folder per site, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspaces import run_cli

pytestmark = pytest.mark.process

TINY = ("--rounds", "2", "--sites", "2", "--quiet")  # site-01 and site-02 of the four


@pytest.mark.slow
def test_init_writes_the_images_and_a_tiny_federation_trains_on_them(tmp_path: Path) -> None:
    ws = tmp_path / "imgs"
    made = run_cli("init", str(ws), "--template", "images-folder")
    assert made.returncode == 0, made.stderr
    assert "Wrote 1797 digit images as PNG files to data/" in made.stdout
    sites = ["site-01", "site-02", "site-03", "site-04"]
    for folder in [*sites, "test"]:
        files = list((ws / "data" / folder).glob("*/img-*.png"))
        assert len(files) > 100, folder
        assert all(f.parent.name.isdigit() for f in files)
    assert len(list((ws / "data").glob("*/*/*.png"))) == 1797

    # (one worker or two give the same model bit for bit: test_template_determinism.py)
    proc = run_cli("simulate", str(ws), *TINY, "--workers", "1", "--run-name", "w1")
    assert proc.returncode == 0, proc.stderr
    run = ws / "runs" / "w1"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failures"] == 0
    assert 0.2 < summary["test_accuracy"] <= 1.0  # two rounds: far above chance (0.1)
    # each site's optimiser and schedule kept in its state folder between the rounds
    assert all((run / "sites" / s / "kept.safetensors").is_file() for s in ("site-01", "site-02"))
