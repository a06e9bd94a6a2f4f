"""The plan: validation that reports every problem, overrides, and the plan hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from workspaces import make_workspace, run_cli

from fedloom import PlanError, load_plan, plan_hash
from fedloom.plan import apply_overrides, validate_plan

pytestmark = pytest.mark.process

THREE_MISTAKES = """\
version: 1
rounds: 0
sites: 4
strategy:
  name: fedadam
  server_lr: -1
training:
  batch_size: many
"""


def test_three_mistakes_are_all_reported_by_the_cli_without_a_traceback(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    (ws / "federation.yaml").write_text(THREE_MISTAKES)
    proc = run_cli("plan", "show", str(ws))
    assert proc.returncode == 2
    err = proc.stderr
    assert "3 problems" in err
    assert "rounds: must be > 0 (got 0)" in err
    assert "strategy.server_lr: must be > 0 (got -1)" in err
    assert "training.batch_size: must be a whole number (got 'many')" in err
    assert "Traceback" not in err + proc.stdout


def test_simulate_refuses_a_bad_plan_before_starting(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    proc = run_cli("simulate", str(ws), "--quiet", "rounds=-2", "data.partition=weird")
    assert proc.returncode == 2
    assert "rounds: must be > 0" in proc.stderr
    assert "data.partition: unknown partition 'weird'" in proc.stderr
    assert not (ws / "runs").exists()


def test_unknown_keys_and_strategy_parameters_are_named() -> None:
    raw = {"roundz": 3, "strategy": {"name": "fedavgm", "momentun": 0.5}}
    with pytest.raises(PlanError) as info:
        validate_plan(raw)
    problems = info.value.problems
    assert any(p.startswith("roundz: unknown key") for p in problems)
    assert any(
        p.startswith("strategy.momentun: strategy 'fedavgm' has no parameter") for p in problems
    )


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(PlanError) as info:
        validate_plan({"strategy": {"name": "fedmagic"}})
    assert "unknown strategy 'fedmagic'" in info.value.problems[0]
    assert "fedavg" in info.value.problems[0]


def test_overrides_set_nested_values_and_a_new_strategy_drops_old_parameters() -> None:
    raw = {"rounds": 3, "strategy": {"name": "fedavgm", "momentum": 0.5}}
    out = apply_overrides(raw, ["rounds=7", "strategy.name=fedadam", "strategy.beta1=0.8"])
    assert out == {"rounds": 7, "strategy": {"name": "fedadam", "beta1": 0.8}}
    plan = validate_plan(out)
    assert plan.rounds == 7
    # every parameter is spelled out, defaults included: the plan hash sees them all
    assert plan.strategy_params == {"server_lr": 0.01, "beta1": 0.8, "beta2": 0.99, "tau": 0.001}
    explicit = validate_plan({"strategy": {"name": "fedadam", "beta1": 0.8, "server_lr": 0.01}})
    assert explicit.canonical_json() == validate_plan(out | {"rounds": 10}).canonical_json()


def test_malformed_override_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="expected key=value"):
        apply_overrides({}, ["rounds"])


def test_roster_from_a_count_and_from_names() -> None:
    assert validate_plan({"sites": 3}).roster == ("site-01", "site-02", "site-03")
    assert validate_plan({"sites": 100}).roster[-1] == "site-100"
    assert validate_plan({"sites": ["b", "a"]}).roster == ("a", "b")
    with pytest.raises(PlanError, match="distinct"):
        validate_plan({"sites": ["a", "a"]})
    with pytest.raises(PlanError, match="sites_per_round"):
        validate_plan({"sites": 3, "sites_per_round": 4})


def test_plan_hash_covers_overrides_and_every_python_file(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    base = plan_hash(load_plan(ws), ws)
    assert base == plan_hash(load_plan(ws), ws)
    assert plan_hash(load_plan(ws, ["rounds=3"]), ws) != base
    (ws / "helper.py").write_text("X = 1\n")
    with_helper = plan_hash(load_plan(ws), ws)
    assert with_helper != base
    (ws / "helper.py").write_text("X = 2\n")
    assert plan_hash(load_plan(ws), ws) != with_helper
    (ws / "runs").mkdir()
    (ws / "runs" / "scratch.py").write_text("ignored = True\n")
    (ws / "helper.py").write_text("X = 2\n")
    assert plan_hash(load_plan(ws), ws) == plan_hash(load_plan(ws), ws)


def test_plan_show_prints_the_plan_and_its_hash(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    proc = run_cli("plan", "show", str(ws), "rounds=4")
    assert proc.returncode == 0, proc.stderr
    assert "rounds: 4" in proc.stdout
    assert f"plan hash: {plan_hash(load_plan(ws, ['rounds=4']), ws)}" in proc.stdout


def test_missing_workspace_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli("plan", "show", str(tmp_path / "nowhere"))
    assert proc.returncode == 3
    assert "is not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_krum_needing_more_updates_than_a_round_has_is_a_plan_error() -> None:
    with pytest.raises(PlanError) as info:
        validate_plan({"sites": 5, "strategy": {"name": "krum", "num_byzantine": 2}})
    assert (
        "strategy.num_byzantine: krum with these parameters needs at least 7 updates"
        in (info.value.problems[0])
    )
    assert validate_plan({"sites": 7, "strategy": {"name": "krum", "num_byzantine": 2}})


def test_plan_hash_covers_python_files_in_data_too(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    before = plan_hash(load_plan(ws), ws)
    (ws / "data").mkdir()
    (ws / "data" / "loader.py").write_text("def load(): ...\n")
    assert plan_hash(load_plan(ws), ws) != before


def test_a_plan_that_is_not_utf8_is_a_plan_error(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    (ws / "federation.yaml").write_bytes(b"rounds: 3\nname: caf\xe9\n")
    with pytest.raises(PlanError, match="not UTF-8"):
        load_plan(ws)


@pytest.mark.parametrize("task", ["../evil.py", "/etc/passwd", "task.txt", "sub/../../x.py"])
def test_the_task_module_must_be_inside_the_workspace(task: str) -> None:
    with pytest.raises(PlanError, match="must name a .py file inside the workspace"):
        validate_plan({"task": task})
    assert validate_plan({"task": "code/task.py"}).task == "code/task.py"


def test_strict_values_and_unambiguous_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="rounds: must be a whole number"):
        validate_plan({"rounds": True})
    with pytest.raises(PlanError, match="synthetic dataset makes each site's own data"):
        validate_plan({"data": {"dataset": "synthetic", "partition": "dirichlet:0.3"}})
    ws = make_workspace(tmp_path, "breast-cancer")
    (ws / "federation.yaml").write_text("rounds: 3\nseed: 1\nrounds: 5\n")
    with pytest.raises(PlanError, match="key 'rounds' is written twice"):
        load_plan(ws)


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        ({"round": 3}, "round: unknown key for this section (did you mean `rounds`?)"),
        (
            {"training": {"epoch": 2}},
            "training.epoch: unknown key for this section (did you mean `epochs`?)",
        ),
        ({"data": {"partiton": "iid"}}, "(did you mean `partition`?)"),
        ({"strategy": {"name": "fedprox", "proximal_m": 0.1}}, "(did you mean `proximal_mu`?)"),
    ],
)
def test_a_misspelt_key_is_answered_with_the_nearest_one(plan: dict, expected: str) -> None:
    with pytest.raises(PlanError) as err:
        validate_plan(plan)
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_a_key_unlike_any_other_gets_no_guess() -> None:
    with pytest.raises(PlanError) as err:
        validate_plan({"zzzz": 1})
    assert "did you mean" not in str(err.value) and "unknown key" in str(err.value)


def test_python_dash_m_fedloom_runs_the_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fedloom", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.startswith("fedloom "), done.stderr
