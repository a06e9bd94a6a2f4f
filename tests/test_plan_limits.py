"""A plan cannot exhaust memory or overflow: YAML anchors and aliases are refused, every
numeric setting has a documented cap, non-finite numbers are refused; all reported as
plan errors, for the file and for key=value overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from workspaces import make_workspace, run_cli

from fedloom import PlanError
from fedloom.core.errors import PolicyError
from fedloom.plan import MAX_NESTING, MAX_PLAN_BYTES, load_plan, validate_plan
from fedloom.privacy.policy import load_policy

# 9 levels of 9 aliases: 9**9 (387 million) strings once expanded, in 351 bytes
ALIAS_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{a}: &{a} [{','.join([f'*{p}'] * 9)}]\n"
        for p, a in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "name: *i\n"
)


def _plan_file(tmp_path: Path, text: str) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "federation.yaml").write_text(text)
    return ws


def _problems(ws: Path, *overrides: str) -> list[str]:
    with pytest.raises(PlanError) as caught:
        load_plan(ws, overrides)
    return caught.value.problems


@pytest.mark.parametrize(
    "text",
    [
        ALIAS_BOMB,
        "name: &n fed\n",  # an anchor alone
        "training: &t {epochs: 2}\nevaluation: *t\n",
        "base: &b {epochs: 2}\ntraining:\n  <<: *b\n",  # a merge key
    ],
    ids=["bomb", "anchor", "alias", "merge"],
)
def test_anchors_and_aliases_are_refused_with_where(tmp_path: Path, text: str) -> None:
    problems = _problems(_plan_file(tmp_path, text))
    assert len(problems) == 1
    assert problems[0].startswith("anchors and aliases (&name, *name, <<: *name)")
    assert re.search(r"\(line \d+, column \d+\)$", problems[0])


def test_an_alias_in_an_override_is_refused(tmp_path: Path) -> None:
    ws = _plan_file(tmp_path, "rounds: 2\n")
    with pytest.raises(PlanError) as caught:
        load_plan(ws, ["sites=[&a x, *a, *a]"])
    assert caught.value.source == "overrides"
    assert "anchors and aliases" in caught.value.problems[0]


def test_deep_nesting_long_numbers_and_large_files_are_refused(tmp_path: Path) -> None:
    deep = "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    assert "nested more than" in _problems(_plan_file(tmp_path, f"name: {deep}\n"))[0]
    assert "nested more than" in _problems(tmp_path / "ws", f"name={deep}")[0]
    very_deep = "[" * 100_000 + "]" * 100_000  # would exhaust Python's recursion
    assert "nested more than" in _problems(_plan_file(tmp_path, f"name: {very_deep}\n"))[0]
    long = "9" * 5000  # more digits than Python turns into an int by default
    assert "longer than any setting" in _problems(_plan_file(tmp_path, f"rounds: {long}\n"))[0]
    ws = _plan_file(tmp_path, "rounds: 2\n")
    assert "a key at most 16 deep" in _problems(ws, "a." * MAX_NESTING + "x=1")[0]
    padded = "rounds: 2\n" + "#" * MAX_PLAN_BYTES + "\n"
    assert "larger than 1048576 bytes" in _problems(_plan_file(tmp_path, padded))[0]


NON_FINITE = [".inf", "-.inf", ".nan", ".NaN", "1.0e+400"]
FLOAT_PATHS = [
    "deadline.round_seconds",
    "deadline.min_fraction",
    "training.lr",
    "training.momentum",
    "training.weight_decay",
    "data.val_fraction",
    "data.synthetic.alpha",
    "privacy.dp.clip",
    "privacy.secure_aggregation.key_seconds",
    "privacy.dp_sgd.max_grad_norm",
]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("path", FLOAT_PATHS)
def test_non_finite_numbers_are_refused_in_the_file_and_overrides(
    tmp_path: Path, path: str, value: str
) -> None:
    ws = _plan_file(tmp_path, _nested(path, value))
    (problem,) = _problems(ws)
    assert problem.startswith(f"{path}: must be a finite number")
    (problem,) = _problems(_plan_file(tmp_path, ""), f"{path}={value}")
    assert problem.startswith(f"{path}: must be a finite number")


def _nested(path: str, value: str) -> str:
    *parents, leaf = path.split(".")
    lines = [f"{'  ' * i}{p}:" for i, p in enumerate(parents)]
    return "\n".join([*lines, f"{'  ' * len(parents)}{leaf}: {value}"]) + "\n"


# every numeric setting without a natural bound, and its documented cap
CAPS: list[tuple[str, Any]] = [
    ("rounds", 100_000),
    ("sites", 10_000),
    ("sites_per_round", 10_000),
    ("seed", 2**63 - 1),
    ("training.epochs", 1000),
    ("training.batch_size", 1_000_000),
    ("training.lr", 100.0),
    ("training.weight_decay", 10.0),
    ("training.max_samples", 1_000_000_000),
    ("data.synthetic.alpha", 100.0),
    ("data.synthetic.beta", 100.0),
    ("deadline.round_seconds", 604_800.0),
    ("deadline.retries", 100),
    ("privacy.dp.noise_multiplier", 100.0),
    ("privacy.dp.clip", 1e6),
    ("privacy.dp.epsilon_budget", 1e6),
    ("privacy.dp.adaptive_clip.learning_rate", 10.0),
    ("privacy.dp.adaptive_clip.count_noise_multiplier", 1000.0),
    ("privacy.secure_aggregation.neighbours", 10_000),
    ("privacy.secure_aggregation.clip_range", 1e6),
    ("privacy.secure_aggregation.key_seconds", 604_800.0),
    ("privacy.dp_sgd.noise_multiplier", 100.0),
    ("privacy.dp_sgd.max_grad_norm", 1e6),
    ("strategy.server_lr", 100.0),  # fedavgm
    ("strategy.proximal_mu", 1000.0),  # fedprox
    ("strategy.tau", 10.0),  # fedadam
    ("strategy.num_byzantine", 10_000),  # krum
]
STRATEGY_OF = {"server_lr": "fedavgm", "proximal_mu": "fedprox", "tau": "fedadam"}


def _raw(path: str, value: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    node = raw
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    if parents == ["strategy"]:
        raw["strategy"]["name"] = STRATEGY_OF.get(leaf, "krum")
    return raw


@pytest.mark.parametrize(("path", "cap"), CAPS)
def test_every_numeric_setting_has_a_cap(path: str, cap: Any) -> None:
    over = cap + 1 if isinstance(cap, int) else cap * 1.5
    with pytest.raises(PlanError) as caught:
        validate_plan(_raw(path, over))
    problem = caught.value.problems[0]
    assert problem.startswith(f"{path}: ") and re.search(r"<= |at most", problem), problem
    if path in {"rounds", "training.lr", "deadline.retries", "training.epochs"}:
        validate_plan(_raw(path, cap))  # the cap itself is allowed


@pytest.mark.process
def test_plan_show_answers_at_once_on_an_alias_bomb_and_ten_million_sites(
    tmp_path: Path,
) -> None:
    bomb = _plan_file(tmp_path, ALIAS_BOMB)
    proc = run_cli("plan", "show", str(bomb), timeout=60)  # it used to run out of memory
    assert proc.returncode == 2, proc.stderr
    assert "anchors and aliases" in proc.stderr and "Traceback" not in proc.stderr
    ws = make_workspace(tmp_path, "breast-cancer")
    proc = run_cli("plan", "show", str(ws), "sites=10000000", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "sites: at most 10000 sites (got 10000000)" in proc.stderr


@pytest.mark.process
@pytest.mark.parametrize("command", [("simulate",), ("aggregator", "start")])
def test_an_infinite_deadline_is_a_plan_error_not_a_traceback(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    proc = run_cli(*command, str(ws), "deadline.round_seconds=.inf", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "deadline.round_seconds: must be a finite number (got inf)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_site_policy_refuses_aliases_too(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(PolicyError, match="anchors and aliases"):
        load_policy(path)
