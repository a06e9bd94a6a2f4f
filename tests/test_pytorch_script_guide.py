"""The guide "Your PyTorch script, federated": the script and its federated version run,
the diff between them stays small, and the guide shows that very diff.

Run this file as a script to print the diff to paste into the guide:
``python tests/test_pytorch_script_guide.py``.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from workspaces import REPO, run_cli

pytestmark = pytest.mark.process

EXAMPLE = REPO / "docs" / "examples" / "pytorch-script"
GUIDE = REPO / "docs" / "guide-pytorch-script.md"
MAX_CHANGED = 15


def script_diff() -> str:
    """``diff -u train.py federated/task.py``, without timestamps."""
    before = (EXAMPLE / "train.py").read_text().splitlines()
    after = (EXAMPLE / "federated" / "task.py").read_text().splitlines()
    lines = difflib.unified_diff(before, after, "train.py", "federated/task.py", lineterm="", n=3)
    return "\n".join(lines) + "\n"


def changed_lines(diff: str) -> int:
    """Added plus removed lines of a unified diff (not its headers, not context)."""
    body = [line for line in diff.splitlines() if not line.startswith(("+++ ", "--- "))]
    return sum(1 for line in body if line[:1] in "+-")


def test_the_script_is_federated_by_at_most_15_changed_lines() -> None:
    diff = script_diff()
    assert 0 < changed_lines(diff) <= MAX_CHANGED, diff


def test_the_guide_shows_the_real_diff_and_its_count() -> None:
    guide = GUIDE.read_text()
    shown = re.search(r"```diff\n(.*?)```", guide, re.S)
    assert shown is not None, "the guide has no ```diff block"
    assert shown.group(1) == script_diff(), "regenerate: python tests/test_pytorch_script_guide.py"
    assert f"{changed_lines(script_diff())} changed lines" in guide
    script = re.search(r"```python\n(.*?)```", guide, re.S)
    assert script is not None and script.group(1) == (EXAMPLE / "train.py").read_text()


@pytest.mark.slow
def test_the_script_and_its_federated_version_both_train(tmp_path: Path) -> None:
    ws = tmp_path / "federated"
    shutil.copytree(EXAMPLE / "federated", ws)
    made = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), str(ws / "data"), "--sites", "2",
         "--per-site", "100"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr

    alone = subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), str(ws / "data" / "site-01")],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    assert "epoch 5: train loss" in alone.stdout
    test = re.search(r"test: \{'loss': [0-9.]+, 'accuracy': ([0-9.]+)\}", alone.stdout)
    assert test is not None and 0 <= float(test.group(1)) <= 1, alone.stdout

    fed = run_cli("simulate", str(ws), "--rounds", "2", "--sites", "2", "--run-name", "r")
    assert fed.returncode == 0, fed.stderr
    summary = json.loads((ws / "runs" / "r" / "summary.json").read_text())
    assert summary["failures"] == 0
    assert 0.2 < summary["test_accuracy"] <= 1.0  # two rounds on 160 images: above chance
    assert summary["mean_site_accuracy"] > 0.2


if __name__ == "__main__":
    print(script_diff(), end="")
