"""The documentation ships with fedloom: every page a message names is printed by
``fedloom docs``, from a checkout and from a built wheel, and the Python API's hints
speak Python."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner
from workspaces import REPO, run_cli

from fedloom import WorkspaceError, create_workspace
from fedloom.cli.main import app
from fedloom.docpages import page_names, read_page, section_of
from fedloom.tasks.loader import load_task

pytestmark = pytest.mark.process

SRC = REPO / "src" / "fedloom"
_REF = re.compile(r"""doc_ref\(\s*["']([^"']+)["'](?:\s*,\s*["']([^"']+)["'])?""")


def test_a_hint_names_the_command_that_prints_its_page(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text(
        "from fedloom.tasks import SoftmaxRegression\n"
        "class Old(SoftmaxRegression):\n"
        "    def evaluate(self, weights, x, y):\n"
        "        return None\n"
        "task = Old(4, 2)\n"
    )
    with pytest.raises(WorkspaceError) as err:
        load_task(tmp_path)
    hint = err.value.hint or ""
    assert "docs/tasks.md#migrating-from-the-older-interface" in hint
    command = re.search(r"`fedloom (docs [^`]+)` prints it", hint)
    assert command is not None, hint
    shown = run_cli(*command.group(1).split())  # a real process, as the user runs it
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("## Migrating from the older interface\n")
    assert not [line for line in shown.stdout.splitlines()[1:] if re.match(r"#{1,2} ", line)]
    assert "`def load_test_data(self)`" in shown.stdout
    runner = CliRunner(env={"COLUMNS": "1000", "NO_COLOR": "1"})
    listed = runner.invoke(app, ["docs"])
    assert listed.exit_code == 0
    assert re.search(r"^cli/policy +`fedloom policy`$", listed.stdout, re.MULTILINE)
    wrong = runner.invoke(app, ["docs", "docs/task.md"])
    assert wrong.exit_code == 2 and "did you mean tasks?" in wrong.stderr


def test_every_page_a_message_names_exists() -> None:
    refs = [m.groups() for p in SRC.rglob("*.py") for m in _REF.finditer(p.read_text())]
    assert len(refs) >= 5
    for page, section in refs:
        assert page in page_names(), page
        assert section is None or section_of(read_page(page), section) is not None, section
    # no message names a docs/ page without the command: docstrings and comments may
    bare = [
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in SRC.rglob("*.py")
        for node in _strings(ast.parse(path.read_text()))
        if re.search(r"docs/[a-z][\w/-]*\.md", node.value)
    ]
    assert bare == []


def _strings(tree: ast.Module) -> list[ast.Constant]:
    """The string constants of ``tree`` that are not docstrings."""
    docstrings = {
        id(body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and (body := node.body)
        and isinstance(body[0], ast.Expr)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def test_a_wheel_carries_the_pages(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")  # builds offline, with this environment's setuptools
    tree = tmp_path / "fedloom"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    shutil.copytree(REPO / "docs", tree / "docs")
    shutil.copytree(
        REPO / "src", tree / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", *offline, "-w", str(dist), str(tree)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("fedloom-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("fedloom/docs/")}
    assert shipped == {f"fedloom/docs/{page}.md" for page in page_names()}


def test_the_python_api_hints_at_force_true(tmp_path: Path) -> None:
    create_workspace(tmp_path / "ws", "breast-cancer", data=False)
    with pytest.raises(WorkspaceError) as err:
        create_workspace(tmp_path / "ws", "breast-cancer", data=False)
    assert "pass force=True" in (err.value.hint or "")
    assert "--force" not in str(err.value)
    cli = run_cli("init", str(tmp_path / "ws"))
    assert cli.returncode == 3 and "pass --force" in cli.stderr and "force=True" not in cli.stderr
