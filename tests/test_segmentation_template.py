"""The segmentation template: its generated MRI-like cases on disk, and a tiny federation
of the template's own 3D U-Net and loop reading them back (that one and two workers
train it bit-identically is tests/test_template_determinism.py's)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from workspaces import run_cli

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.templates.segmentation_data import SITES, TEST_FOLDER, case, generate

pytestmark = pytest.mark.slow

# the two smallest hospitals (22 training cases), one round of one epoch, no evaluation
# but the test set's
TINY = [
    "sites=[hospital-c, hospital-d]",
    "rounds=1",
    "training.epochs=1",
    "evaluation.each_round=false",
    "evaluation.final=false",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fedloom init seg --template segmentation``, as a user runs it."""
    ws = tmp_path_factory.mktemp("seg") / "seg"
    done = run_cli("init", str(ws), "--template", "segmentation")
    assert done.returncode == 0, done.stderr
    assert "Wrote 120 generated MRI-like cases" in done.stdout
    return ws


def cases(folder: Path) -> list[Path]:
    return sorted(folder.glob("case-*.npz"))


@pytest.mark.process
def test_init_writes_one_file_per_case_for_every_site_and_the_test_set(workspace: Path) -> None:
    for site, (_, n) in SITES.items():
        assert len(cases(workspace / "data" / site)) == n
    assert len(cases(workspace / "data" / TEST_FOLDER)) == 24
    with np.load(cases(workspace / "data" / "hospital-a")[0], allow_pickle=False) as f:
        assert f["image"].shape == (1, 24, 24, 24)
        assert f["mask"].shape == (24, 24, 24)


def test_the_generator_is_deterministic_and_its_masks_binary_and_not_empty(
    tmp_path: Path,
) -> None:
    scanner = SITES["hospital-c"][0]
    first = case(np.random.default_rng(7), scanner)
    again = case(np.random.default_rng(7), scanner)
    other = case(np.random.default_rng(8), scanner)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    generate(tmp_path / "a", seed=3)
    generate(tmp_path / "b", seed=3)
    for a in sorted((tmp_path / "a").rglob("*.npz")):
        b = tmp_path / "b" / a.relative_to(tmp_path / "a")
        with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
            assert np.array_equal(x["image"], y["image"])
            assert np.array_equal(x["mask"], y["mask"])
            assert set(np.unique(x["mask"])) == {0, 1}


@pytest.mark.process  # the workspace fixture runs `fedloom init`
def test_the_sites_scanners_differ_in_intensity(workspace: Path) -> None:
    stats = {}
    for site in SITES:
        images = [np.load(p, allow_pickle=False)["image"] for p in cases(workspace / "data" / site)]
        stats[site] = (np.mean([i.mean() for i in images]), np.mean([i.std() for i in images]))
    means = sorted(m for m, _ in stats.values())
    assert all(b - a > 0.05 for a, b in zip(means, means[1:], strict=False))
    assert stats["hospital-b"][1] > 1.5 * stats["hospital-c"][1]


@pytest.mark.process  # the workspace fixture runs `fedloom init`
def test_a_tiny_federation_and_its_baseline_report_dice_and_iou(workspace: Path) -> None:
    plan = load_plan(workspace, TINY)
    result = simulate(workspace, plan, SimulationOptions(workers=0, baseline=True))
    for metrics in (result.test_metrics, result.centralized_metrics or {}):
        for name in ("dice", "iou"):
            assert math.isfinite(metrics[name]) and 0 <= metrics[name] <= 1
        assert metrics["iou"] <= metrics["dice"]


def test_a_torch_loop_reads_the_rounds_training_settings_from_its_context() -> None:
    import torch
    from torch import nn

    from fedloom import SiteContext, TrainSettings
    from fedloom.tasks import SiteDatasets, TorchLoop

    seen: list[TrainSettings] = []

    def train(model: nn.Module, data: object, ctx: SiteContext) -> None:
        seen.append(ctx.settings)

    task = TorchLoop(lambda: nn.Linear(2, 1), train, lambda m, d, c: {})
    data = SiteDatasets([(torch.zeros(2), torch.zeros(1))], [])
    settings = TrainSettings(epochs=7, batch_size=3, lr=0.5)
    task.train(task.init_weights(0), data, settings, SiteContext("a", 0, 1, 0))
    assert seen == [settings]
