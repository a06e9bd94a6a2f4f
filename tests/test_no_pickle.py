"""fedloom never unpickles anything: checked under an audit hook in every process."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from workspaces import FEDLOOM, REPO, make_workspace

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


@pytest.mark.process
def test_the_guard_catches_unpickling(tmp_path: Path) -> None:
    env = _guarded_env(tmp_path)
    code = "import pickle; pickle.loads(pickle.dumps({'a': 1}))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unpickling attempted" in proc.stderr


@pytest.mark.process
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


PICKLERS = {"pickle", "cloudpickle", "dill"}


def forbidden_calls(source: str, path: str = "<source>") -> tuple[list[str], list[str]]:
    """Where ``source`` sleeps a fixed time or may unpickle, read from its syntax tree.

    A sleep is a call of ``time.sleep`` (however ``time`` or ``sleep`` was imported or
    renamed) whose line does not say ``# backoff``. Unpickling is an import of pickle,
    cloudpickle or dill, or ``allow_pickle=True`` passed to any call.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    time_names, sleep_names = {"time"}, set()
    sleeps: list[str] = []
    pickles: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "time":
                    time_names.add(alias.asname or "time")
                if alias.name.split(".")[0] in PICKLERS:
                    pickles.append(f"{path}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLERS:
                pickles.append(f"{path}:{node.lineno}")
            if node.module == "time":
                sleep_names |= {a.asname or a.name for a in node.names if a.name == "sleep"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_sleep = (
            isinstance(func, ast.Attribute)
            and func.attr == "sleep"
            and isinstance(func.value, ast.Name)
            and func.value.id in time_names
        ) or (isinstance(func, ast.Name) and func.id in sleep_names)
        if is_sleep and "# backoff" not in lines[node.lineno - 1]:
            sleeps.append(f"{path}:{node.lineno}")
        for keyword in node.keywords:
            value = keyword.value
            if keyword.arg == "allow_pickle" and not (
                isinstance(value, ast.Constant) and value.value is False
            ):
                pickles.append(f"{path}:{node.lineno}")
    return sleeps, pickles


def test_the_sleep_and_pickle_check_catches_violations() -> None:
    source = (
        "import time as t\n"
        "from time import sleep as nap\n"
        "import dill\n"
        "from pickle import loads\n"
        "import numpy as np\n"
        "t.sleep(1)\n"
        "nap(0.5)\n"
        "t.sleep(2)  # backoff\n"
        "np.load('x.npy', allow_pickle=True)\n"
        "np.load('x.npy', allow_pickle=False)\n"
        "text = 'time.sleep(1) import pickle'\n"
    )
    sleeps, pickles = forbidden_calls(source)
    assert sleeps == ["<source>:6", "<source>:7"]
    assert pickles == ["<source>:3", "<source>:4", "<source>:9"]


def test_no_fixed_sleeps_or_pickle_in_src() -> None:
    sleeps: list[str] = []
    pickles: list[str] = []
    for path in sorted((REPO / "src" / "fedloom").rglob("*.py")):
        found = forbidden_calls(path.read_text(), str(path))
        sleeps += found[0]
        pickles += found[1]
    assert sleeps == []
    assert pickles == []
