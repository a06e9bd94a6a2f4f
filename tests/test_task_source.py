"""The task runs from its source, exactly the bytes the plan hash covers: a planted
bytecode cache, a sourceless ``.pyc`` or a module under a skipped folder never runs."""

from __future__ import annotations

import importlib.util
import marshal
import socket
import struct
from pathlib import Path

import pytest
from workspaces import make_workspace, run_cli

from fedloom import WorkspaceError, load_plan, plan_hash
from fedloom.pki import provision
from fedloom.tasks.loader import load_task
from fedloom.workspace import WorkspaceCode

TASK = "from fedloom.tasks import SoftmaxRegression\ntask = SoftmaxRegression(30, 2)\n"


def _evil(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\n{TASK}"


def _plant_bytecode(source: Path, code_text: str) -> Path:
    """Write, where Python looks for ``source``'s cache, bytecode compiled from
    ``code_text`` and marked as never to be checked against the source (PEP 552)."""
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.parent.mkdir(exist_ok=True)
    code = compile(code_text, str(source), "exec")
    unchecked_hash_based = struct.pack("<I", 0b01)
    header = importlib.util.MAGIC_NUMBER + unchecked_hash_based
    pyc.write_bytes(header + importlib.util.source_hash(source.read_bytes()) + marshal.dumps(code))
    return pyc


def _sourceless(path: Path, code_text: str) -> None:
    """A compiled module with no source beside it (what `compileall -b` leaves)."""
    code = compile(code_text, str(path), "exec")
    header = importlib.util.MAGIC_NUMBER + struct.pack("<III", 0, 0, 0)
    path.write_bytes(header + marshal.dumps(code))


def test_a_planted_bytecode_cache_of_the_task_or_a_helper_never_runs(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "helper.py").write_text("CLASSES = 2\n")
    (ws / "task.py").write_text(
        "from helper import CLASSES\n"
        "from fedloom.tasks import SoftmaxRegression\n"
        "task = SoftmaxRegression(30, CLASSES)\n"
    )
    marker = tmp_path / "ran"
    _plant_bytecode(ws / "task.py", _evil(marker))
    _plant_bytecode(ws / "helper.py", f"open({str(marker)!r}, 'w').write('ran')\nCLASSES = 2\n")
    task = load_task(ws)
    assert not marker.exists()
    assert task.init_weights(0)["weight"].shape == (30, 2)  # type: ignore[index]


def test_the_loader_writes_no_bytecode_cache(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "helper.py").write_text("CLASSES = 3\n")
    (ws / "task.py").write_text(TASK.replace("2)", "__import__('helper').CLASSES)"))
    load_task(ws)
    assert not (ws / "__pycache__").exists()


def test_the_code_that_runs_is_the_code_that_was_hashed(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    code = WorkspaceCode.read(ws)
    plan = load_plan(ws)
    before = plan_hash(plan, code)
    marker = tmp_path / "ran"
    (ws / "task.py").write_text(_evil(marker))  # changed after the hash was taken
    task = load_task(code, plan.task)  # runs the bytes that were hashed
    assert not marker.exists() and task.init_weights(0)
    assert plan_hash(plan, ws) != before  # and the change is seen by a fresh hash
    load_task(ws, plan.task)  # a fresh read runs the new code, not a cached module
    assert marker.exists()


@pytest.mark.parametrize("where", ["extra.pyc", "runs/__init__.py"])
def test_code_the_plan_hash_does_not_cover_is_refused_by_name(tmp_path: Path, where: str) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    name = where.split("/")[0].removesuffix(".pyc")
    (ws / "task.py").write_text(f"import {name}\n{TASK}")
    marker = tmp_path / "ran"
    target = ws / where
    target.parent.mkdir(exist_ok=True)
    if where.endswith(".pyc"):
        _sourceless(target, _evil(marker))
    else:
        target.write_text(_evil(marker))
    assert "runs/__init__.py" not in WorkspaceCode.read(ws).files  # runs/ is not hashed
    with pytest.raises(WorkspaceError) as caught:
        load_task(ws)
    assert not marker.exists()
    assert f"{where}: not loaded" in str(caught.value)
    assert "plan hash" in str(caught.value)


def test_a_folder_of_modules_without_init_is_imported_from_its_source(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    (ws / "models" / "linear.py").write_text("CLASSES = 2\n")
    (ws / "task.py").write_text(f"from models.linear import CLASSES\n{TASK}")
    _plant_bytecode(ws / "models" / "linear.py", "CLASSES = 5\n")
    assert load_task(ws).init_weights(0)["weight"].shape == (30, 2)  # type: ignore[index]


@pytest.mark.process
def test_simulate_runs_the_task_source_not_a_planted_cache(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    marker = tmp_path / "ran"
    _plant_bytecode(ws / "task.py", _evil(marker))
    proc = run_cli("simulate", str(ws), "--workers", "1", "--quiet", "rounds=1", "sites=2")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


@pytest.mark.process
def test_collaborator_start_runs_the_task_source_not_a_planted_cache(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    provision(ws, ["site-01", "site-02"])
    marker = tmp_path / "ran"
    _plant_bytecode(ws / "task.py", _evil(marker))
    with socket.socket() as s:  # a port nothing listens on: the site gives up
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli(
        "collaborator", "start", str(ws), "--name", "site-01",
        "--aggregator", f"127.0.0.1:{port}", "--give-up-after", "1",
    )  # fmt: skip
    assert "not reach" in proc.stdout + proc.stderr or proc.returncode != 0
    assert not marker.exists()


def test_a_helper_of_another_workspace_never_stands_in_for_this_ones(tmp_path: Path) -> None:
    loaded = []
    for n in (2, 3):
        ws = tmp_path / f"ws{n}"
        ws.mkdir()
        (ws / "shared_helper.py").write_text(f"CLASSES = {n}\n")
        task = f"from shared_helper import CLASSES\n{TASK}".replace("30, 2)", "30, CLASSES)")
        (ws / "task.py").write_text(task)
        loaded.append(load_task(ws))
    assert [t.init_weights(0)["weight"].shape[1] for t in loaded] == [2, 3]  # type: ignore[index]


def test_a_project_of_the_workspace_on_sys_path_is_imported_from_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with a project installed in editable mode: its folder is on sys.path, and its
    modules, being the workspace's .py files, run from the bytes the plan hash covers."""
    ws = tmp_path / "ws"
    package = ws / "lib" / "src" / "fedloom_test_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core.py").write_text("CLASSES = 2\n")
    task = f"from fedloom_test_pkg.core import CLASSES\n{TASK}".replace("30, 2)", "30, CLASSES)")
    (ws / "task.py").write_text(task)
    _plant_bytecode(package / "core.py", "CLASSES = 7\n")
    monkeypatch.syspath_prepend(str(ws / "lib" / "src"))
    assert "lib/src/fedloom_test_pkg/core.py" in WorkspaceCode.read(ws).files
    assert load_task(ws).init_weights(0)["weight"].shape == (30, 2)  # type: ignore[index]
