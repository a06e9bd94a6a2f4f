"""fedloom never unpickles anything: checked under an audit hook in every process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from workspaces import FEDLOOM, REPO, make_workspace

pytestmark = pytest.mark.process

GUARD = """
import os, sys

def _refuse(*args, **kwargs):
    raise RuntimeError("unpickling attempted in pid %d" % os.getpid())

def _hook(event, args):
    if event == "pickle.find_class":
        _refuse()

sys.addaudithook(_hook)
import pickle
pickle.loads = _refuse
pickle.load = _refuse

class _NoUnpickler:
    def __init__(self, *args, **kwargs):
        _refuse()

pickle.Unpickler = _NoUnpickler
with open(os.environ["FEDLOOM_GUARD_LOG"], "a") as fh:
    fh.write("%d\\n" % os.getpid())
"""


def _guarded_env(tmp_path: Path) -> dict[str, str]:
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(guard_dir), os.environ.get("PYTHONPATH", "")]),
        "FEDLOOM_GUARD_LOG": str(tmp_path / "guarded-pids.txt"),
    }


def test_the_guard_catches_unpickling(tmp_path: Path) -> None:
    env = _guarded_env(tmp_path)
    code = "import pickle; pickle.loads(pickle.dumps({'a': 1}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unpickling attempted" in proc.stderr


def test_a_federation_with_worker_processes_never_unpickles(tmp_path: Path) -> None:
    env = _guarded_env(tmp_path)
    ws = make_workspace(tmp_path, "digits")
    proc = subprocess.run(
        [*FEDLOOM, "simulate", str(ws), "--workers", "2", "--roundtrip", "--quiet",
         "--baseline", "--run-name", "guarded", "rounds=2", "sites=4"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "unpickling attempted" not in proc.stderr
    pids = set((tmp_path / "guarded-pids.txt").read_text().split())
    assert len(pids) >= 3  # the aggregator's process and both workers ran under the guard
    assert (ws / "runs" / "guarded" / "final.safetensors").is_file()


def test_no_fixed_sleeps_or_pickle_in_src() -> None:
    sleeps, pickles = [], []
    for path in (REPO / "src" / "fedloom").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btime\.sleep\(", line) and "# backoff" not in line:
                sleeps.append(f"{path}:{number}")
            if re.search(r"^\s*(import|from)\s+(pickle|cloudpickle|dill)\b", line):
                pickles.append(f"{path}:{number}")
            if "allow_pickle=True" in line.replace(" ", ""):
                pickles.append(f"{path}:{number}")
    assert sleeps == []
    assert pickles == []
