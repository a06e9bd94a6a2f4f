"""The command line as a user meets it: real processes, exit codes, no tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest
from workspaces import HEAVY_MODULES, heavy_imports, imported_modules, run_cli

from fedloom import load_plan
from fedloom.templates import TEMPLATES

pytestmark = pytest.mark.process


@pytest.mark.parametrize("template", TEMPLATES)
def test_init_writes_a_workspace_whose_plan_validates(tmp_path: Path, template: str) -> None:
    proc = run_cli("init", str(tmp_path / template), "--template", template)
    assert proc.returncode == 0, proc.stderr
    plan = load_plan(tmp_path / template)
    assert plan.task == "task.py" and plan.rounds > 0
    # an analysis runs fedloom's own statistics task: its template has no task module
    assert (tmp_path / template / "task.py").is_file() == (plan.analysis is None)
    assert f"Next: fedloom {'simulate' if plan.analysis is None else 'analyze'}" in proc.stdout


def test_init_refuses_a_folder_that_is_not_empty_and_an_unknown_template(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine\n")
    proc = run_cli("init", str(tmp_path / "taken"))
    assert proc.returncode == 3 and "not empty" in proc.stderr and "--force" in proc.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine\n"
    proc = run_cli("init", str(tmp_path / "x"), "--template", "cifar")
    assert proc.returncode == 3 and "unknown template 'cifar'" in proc.stderr


def test_strategies_lists_every_strategy_with_its_parameters() -> None:
    proc = run_cli("strategies")
    assert proc.returncode == 0
    for name in ("fedavg", "fedadam", "krum", "multi-krum", "trimmed-mean", "median"):
        assert name in proc.stdout
    assert "server_lr=0.01" in proc.stdout and "num_byzantine=1" in proc.stdout


@pytest.mark.parametrize(
    "args",
    [("simulate",), ("simulate", ".", "--rounds", "abc"), ("nosuch",)],
    ids=["missing-argument", "bad-option-value", "unknown-command"],
)
def test_usage_errors_exit_2_without_a_traceback(args: tuple[str, ...]) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("fedloom ")


@pytest.mark.parametrize("name", ["../escape", "a/b", ".."])
def test_a_run_name_must_be_a_plain_folder_name(tmp_path: Path, name: str) -> None:
    from fedloom import create_workspace

    ws = create_workspace(tmp_path / "ws", "breast-cancer")
    proc = run_cli("simulate", str(ws), "--run-name", name, "--workers", "0", "rounds=1")
    assert proc.returncode == 3 and "must be a plain folder name" in proc.stderr
    assert not (tmp_path / "escape").exists() and not (ws / "runs").exists()


def test_help_starts_without_importing_the_heavy_modules() -> None:
    modules = imported_modules("--help")
    assert "fedloom.cli.main" in modules
    # pydantic too: the plan's models load with the first command that reads a plan
    assert heavy_imports(modules, (*HEAVY_MODULES, "pydantic")) == []


def test_the_cli_copies_of_library_defaults_agree_with_the_library() -> None:
    from fedloom.cli import pki as cli_pki
    from fedloom.cli import policy as cli_policy
    from fedloom.pki.authority import CA_DAYS
    from fedloom.privacy.policy import POLICY_FILE

    assert (cli_pki.CA_DAYS, cli_policy.POLICY_FILE) == (CA_DAYS, POLICY_FILE)
