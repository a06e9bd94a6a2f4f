"""The site policy: loading ``policy.yaml``, checking real plans against it, the metrics
that may leave a site, and ``fedloom policy check / init / approve``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner
from workspaces import run_cli

from fedloom.cli.main import app
from fedloom.core.errors import PolicyError
from fedloom.plan import Plan, load_plan, plan_hash
from fedloom.privacy.policy import (
    Policy,
    Violation,
    check_policy,
    filter_metrics,
    load_policy,
    policy_refusal,
    policy_warnings,
)
from fedloom.templates import create_workspace

STRICT = """\
version: 1
max_rounds: 50
dp:
  required: true
  min_noise_multiplier: 0.8
  max_clip: 1.0
  max_epsilon: 8.0
  max_delta: 1.0e-5
  distributed_noise: true
dp_sgd: {required: true, min_noise_multiplier: 1.0, max_grad_norm: 1.0}
secure_aggregation: {required: true, min_threshold: 0.6, min_bits: 64}
metrics:
  allowed: [global_accuracy, global_loss, val_samples]
  sample_level: true
"""

PRIVATE = {
    "dp": {
        "noise_multiplier": 1.2,
        "clip": 0.5,
        "epsilon_budget": 5.0,
        "noise": "distributed",
    },
    "secure_aggregation": {"threshold": 0.8, "bits": 64},
    "dp_sgd": {"noise_multiplier": 1.1, "max_grad_norm": 0.9},
}


def workspace(root: Path, privacy: dict[str, Any] | None = None, **plan: Any) -> Path:
    """A breast-cancer workspace whose federation.yaml has ``privacy`` and ``plan`` set."""
    ws = create_workspace(root / "ws", template="breast-cancer", force=True)
    raw = yaml.safe_load((ws / "federation.yaml").read_text())
    raw.update(plan)
    raw.pop("privacy", None)
    if privacy is not None:
        raw["privacy"] = privacy
    (ws / "federation.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return ws


def planned(ws: Path) -> tuple[Plan, str]:
    plan = load_plan(ws)
    return plan, plan_hash(plan, ws)


def policy_file(root: Path, text: str, name: str = "policy.yaml") -> Path:
    path = root / name
    path.write_text(text)
    return path


def approving(text: str, digest: str) -> str:
    return f"approved_plans: [{digest}]\n{text}"


# ----------------------------------------------------------------- check_policy


def test_a_plan_meeting_every_rule_is_allowed(tmp_path: Path) -> None:
    plan, digest = planned(workspace(tmp_path, PRIVATE))
    policy = load_policy(policy_file(tmp_path, approving(STRICT, digest)))
    assert check_policy(policy, plan, digest) == []
    assert policy_warnings(policy) == ()


def test_a_policy_without_approved_plans_allows_any_plan_with_a_warning(tmp_path: Path) -> None:
    plan, digest = planned(workspace(tmp_path))
    policy = load_policy(policy_file(tmp_path, "version: 1\nmax_rounds: 50\n"))
    assert check_policy(policy, plan, digest) == []
    (warning,) = policy_warnings(policy)
    assert "accepts any plan" in warning and "fedloom policy approve" in warning


def _violation(
    tmp_path: Path, privacy: dict[str, Any] | None, policy: str, **plan: Any
) -> Violation:
    ws = workspace(tmp_path, privacy, **plan)
    found = check_policy(load_policy(policy_file(tmp_path, policy)), *planned(ws))
    assert len(found) == 1, found
    return found[0]


def test_the_noise_multiplier_rule_says_what_to_set(tmp_path: Path) -> None:
    v = _violation(
        tmp_path,
        {"dp": {"noise_multiplier": 0.5}},
        "dp: {min_noise_multiplier: 0.8}",
    )
    assert v.rule == "dp.min_noise_multiplier"
    assert v.message.startswith(
        "the plan's privacy.dp.noise_multiplier is 0.5, the policy demands at least 0.8: "
        "set privacy.dp.noise_multiplier >= 0.8 in federation.yaml"
    )
    assert "the data owner lowers dp.min_noise_multiplier" in v.message


@pytest.mark.parametrize(
    ("privacy", "policy", "plan", "rule", "fix"),
    [
        (None, "max_rounds: 10", {"rounds": 20}, "max_rounds", "set rounds <= 10"),
        (
            None,
            "dp: {required: true, min_noise_multiplier: 0.8, max_clip: 1.0}",
            {},
            "dp.required",
            "add privacy.dp to federation.yaml with noise_multiplier >= 0.8, clip <= 1",
        ),
        (
            {"dp": {"clip": 2.0}},
            "dp: {max_clip: 1.5}",
            {},
            "dp.max_clip",
            "the plan's privacy.dp.clip is 2, the policy allows at most 1.5: "
            "set privacy.dp.clip <= 1.5",
        ),
        (
            {"dp": {"clip": 0.5, "adaptive_clip": {"count_noise_multiplier": 2.0}}},
            "dp: {max_clip: 1.0}",
            {},
            "dp.max_clip",
            "remove privacy.dp.adaptive_clip",
        ),
        (
            {"dp": {}},
            "dp: {max_epsilon: 8.0}",
            {},
            "dp.max_epsilon",
            "set privacy.dp.epsilon_budget <= 8",
        ),
        (
            {"dp": {"epsilon_budget": 10.0}},
            "dp: {max_epsilon: 8.0}",
            {},
            "dp.max_epsilon",
            "the plan's privacy.dp.epsilon_budget is 10, the policy allows at most 8",
        ),
        (
            {"dp": {"delta": 1e-3}},
            "dp: {max_delta: 1.0e-5}",
            {},
            "dp.max_delta",
            "set privacy.dp.delta <= 1e-05",
        ),
        (
            {"dp": {}},
            "dp: {distributed_noise: true}",
            {},
            "dp.distributed_noise",
            "set privacy.dp.noise: distributed and add privacy.secure_aggregation",
        ),
        (
            None,
            "dp_sgd: {min_noise_multiplier: 1.0}",
            {},
            "dp_sgd.required",
            "add privacy.dp_sgd to federation.yaml with noise_multiplier >= 1",
        ),
        (
            {"dp_sgd": {"noise_multiplier": 0.5}},
            "dp_sgd: {min_noise_multiplier: 1.0}",
            {},
            "dp_sgd.min_noise_multiplier",
            "set privacy.dp_sgd.noise_multiplier >= 1",
        ),
        (
            {"dp_sgd": {"max_grad_norm": 5.0}},
            "dp_sgd: {max_grad_norm: 1.0}",
            {},
            "dp_sgd.max_grad_norm",
            "set privacy.dp_sgd.max_grad_norm <= 1",
        ),
        (
            None,
            "secure_aggregation: {required: true}",
            {},
            "secure_aggregation.required",
            "add privacy.secure_aggregation to federation.yaml",
        ),
        (
            {"secure_aggregation": {"threshold": 0.55}},
            "secure_aggregation: {min_threshold: 0.6}",
            {},
            "secure_aggregation.min_threshold",
            "set privacy.secure_aggregation.threshold >= 0.6",
        ),
        (
            {"secure_aggregation": True},
            "secure_aggregation: {min_bits: 64}",
            {},
            "secure_aggregation.min_bits",
            "set privacy.secure_aggregation.bits: 64",
        ),
    ],
)
def test_each_rule_names_itself_and_the_fix(
    tmp_path: Path,
    privacy: dict[str, Any] | None,
    policy: str,
    plan: dict[str, Any],
    rule: str,
    fix: str,
) -> None:
    v = _violation(tmp_path, privacy, policy, **plan)
    assert v.rule == rule
    assert fix in v.message, v.message
    assert "federation.yaml" in v.message and rule.split(".")[0] in v.message


def test_an_unapproved_plan_is_named_by_its_hash(tmp_path: Path) -> None:
    other = "ab" * 32
    ws = workspace(tmp_path)
    plan, digest = planned(ws)
    (v,) = check_policy(load_policy(policy_file(tmp_path, approving("", other))), plan, digest)
    assert v.rule == "approved_plans"
    assert digest in v.message and "fedloom policy approve" in v.message
    (v,) = check_policy(load_policy(policy_file(tmp_path, "approved_plans: []")), plan, digest)
    assert "it approves no plan yet" in v.message


def test_optional_sections_bound_a_plan_only_when_it_uses_them(tmp_path: Path) -> None:
    policy = load_policy(
        policy_file(
            tmp_path,
            "dp: {required: false, min_noise_multiplier: 1.0}\n"
            "dp_sgd: {required: false, max_grad_norm: 1.0}\n"
            "secure_aggregation: {required: false, min_bits: 64}\n",
        )
    )
    assert check_policy(policy, *planned(workspace(tmp_path))) == []
    low = workspace(tmp_path, {"dp": {"noise_multiplier": 0.5}})
    assert [v.rule for v in check_policy(policy, *planned(low))] == ["dp.min_noise_multiplier"]


def test_every_broken_rule_is_reported_at_once(tmp_path: Path) -> None:
    ws = workspace(tmp_path, {"dp": {"noise_multiplier": 0.5, "clip": 3.0}}, rounds=80)
    plan, digest = planned(ws)
    policy = load_policy(policy_file(tmp_path, approving(STRICT, "cd" * 32)))
    rules = [v.rule for v in check_policy(policy, plan, digest)]
    assert rules == [
        "approved_plans",
        "max_rounds",
        "dp.min_noise_multiplier",
        "dp.max_clip",
        "dp.max_epsilon",
        "dp.distributed_noise",
        "dp_sgd.required",
        "secure_aggregation.required",
    ]
    error = policy_refusal(check_policy(policy, plan, digest), source="site/policy.yaml")
    assert error.exit_code == 12
    text = str(error)
    assert "breaks 8 rules of the site policy site/policy.yaml" in text
    for rule in rules:
        assert f"  - {rule}: " in text
    assert "set privacy.dp.clip <= 1 in federation.yaml" in text


def test_a_refusal_needs_a_violation() -> None:
    with pytest.raises(ValueError):
        policy_refusal([])


# ----------------------------------------------------------------- load_policy


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("dp: {min_noise: 0.8}", "dp.min_noise: unknown key; this section takes required, "),
        ("colour: blue", "colour: unknown key; this section takes version, approved_plans"),
        ("max_rounds: many", "max_rounds: must be a whole number (got 'many')"),
        ("dp: {min_noise_multiplier: -1}", "dp.min_noise_multiplier: must be >= 0 (got -1)"),
        ("dp: {required: maybe}", "dp.required: must be true or false (got 'maybe')"),
        ("dp: yes", "dp: must be a section of key: value lines (got True)"),
        ("approved_plans: [abc123]", "approved_plans.0: must be a plan hash: 64 hexadecimal"),
        ("approved_plans: " + "a" * 64, "approved_plans: must be a list"),
        ("secure_aggregation: {min_bits: 48}", "secure_aggregation.min_bits: must be one of"),
        ("version: 2", "version: must be one of"),
        ("max_rounds: [1", "not valid YAML"),
        ("max_rounds: 1\nmax_rounds: 2", "key 'max_rounds' is written twice"),
        ("- a\n- b", "a policy must be a mapping"),
        ("", "the file is empty"),
    ],
)
def test_a_malformed_policy_names_each_problem_with_its_path(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = policy_file(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert err.value.exit_code == 12
    assert str(path) in str(err.value) and problem in str(err.value), str(err.value)


def test_every_problem_of_a_policy_file_is_listed(tmp_path: Path) -> None:
    text = "max_rounds: 0\ndp: {max_clip: -1, colour: red}\nmetrics: {allowed: x}\n"
    with pytest.raises(PolicyError) as err:
        load_policy(policy_file(tmp_path, text))
    message = str(err.value)
    assert "4 problems" in message
    for path in ("max_rounds:", "dp.max_clip:", "dp.colour:", "metrics.allowed:"):
        assert f"  - {path}" in message


def test_a_missing_policy_says_how_to_write_one(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "nowhere.yaml")
    assert "nowhere.yaml not found" in str(err.value) and "fedloom policy init" in str(err.value)
    with pytest.raises(PolicyError, match="is a folder"):
        load_policy(tmp_path)


def test_hashes_are_kept_in_lower_case(tmp_path: Path) -> None:
    policy = load_policy(policy_file(tmp_path, f"approved_plans: [{'AB' * 32}]"))
    assert policy.approved_plans == ("ab" * 32,)


# ----------------------------------------------------------------- metrics


def test_filter_metrics_keeps_what_the_policy_allows() -> None:
    metrics = {"global_accuracy": 0.9, "per_patient_loss": 0.3, "val_samples": 40.0}
    assert filter_metrics(Policy(), metrics) == (metrics, ())
    allowed = Policy.model_validate({"metrics": {"allowed": ["global_accuracy", "val_samples"]}})
    assert filter_metrics(allowed, metrics) == (
        {"global_accuracy": 0.9, "val_samples": 40.0},
        ("per_patient_loss",),
    )
    nothing = Policy.model_validate(
        {"metrics": {"allowed": ["val_samples"], "sample_level": False}}
    )
    assert filter_metrics(nothing, metrics) == ({}, tuple(metrics))
    assert filter_metrics(Policy.model_validate({"metrics": {}}), metrics) == (metrics, ())


# ----------------------------------------------------------------- the command line


def invoke(*args: str | Path) -> Any:
    runner = CliRunner(env={"COLUMNS": "1000", "NO_COLOR": "1"})
    return runner.invoke(app, [str(a) for a in args])


def test_check_allows_a_plan_meeting_the_policy(tmp_path: Path) -> None:
    ws = workspace(tmp_path, PRIVATE)
    _, digest = planned(ws)
    path = policy_file(tmp_path, approving(STRICT, digest))
    result = invoke("policy", "check", ws, "--policy", path)
    assert result.exit_code == 0, result.output
    assert f"plan hash {digest}" in result.stdout
    assert f"allowed: the plan meets every rule of {path}" in result.stdout
    assert "metrics that may leave this site: global_accuracy, global_loss" in result.stdout


def test_check_refuses_a_plan_naming_each_rule(tmp_path: Path) -> None:
    ws = workspace(tmp_path, PRIVATE)
    path = policy_file(tmp_path, STRICT)
    result = invoke("policy", "check", ws, "privacy.dp.noise_multiplier=0.5", "--policy", path)
    assert result.exit_code == 12, result.output
    assert "warning: the policy has no approved_plans" in result.stdout
    assert "breaks 1 rule of the site policy" in result.stderr
    assert "dp.min_noise_multiplier: the plan's privacy.dp.noise_multiplier is 0.5" in result.stderr
    result = invoke("policy", "check", ws, "--policy", tmp_path / "missing.yaml")
    assert result.exit_code == 12 and "fedloom policy init" in result.stderr


def test_init_writes_a_policy_the_plan_meets(tmp_path: Path) -> None:
    for privacy in (
        None,
        PRIVATE,
        {"dp": {"noise_multiplier": 1.2, "adaptive_clip": {"count_noise_multiplier": 2.5}}},
        {"secure_aggregation": True},
    ):
        ws = workspace(tmp_path, privacy)
        out = tmp_path / "site" / "policy.yaml"
        result = invoke("policy", "init", ws, "--out", out, "--force")
        assert result.exit_code == 0, result.output
        result = invoke("policy", "check", ws, "--policy", out)
        assert result.exit_code == 0, result.output
        assert "allowed" in result.stdout and "warning" not in result.stdout
    policy = load_policy(out)
    assert policy.secure_aggregation is not None and policy.dp is None
    assert policy.max_rounds == 20 and out.read_text().startswith("# fedloom site policy")


def test_init_mirrors_the_plans_privacy_as_minimums(tmp_path: Path) -> None:
    ws = workspace(tmp_path, PRIVATE)
    out = tmp_path / "policy.yaml"
    assert invoke("policy", "init", ws, "--out", out).exit_code == 0
    policy = load_policy(out)
    assert policy.dp is not None and policy.dp_sgd is not None
    assert policy.secure_aggregation is not None
    assert (policy.dp.min_noise_multiplier, policy.dp.max_clip) == (1.2, 0.5)
    assert (policy.dp.max_epsilon, policy.dp.distributed_noise) == (5.0, True)
    assert policy.dp_sgd.max_grad_norm == 0.9
    assert (policy.secure_aggregation.min_threshold, policy.secure_aggregation.min_bits) == (
        0.8,
        64,
    )
    result = invoke("policy", "check", ws, "privacy.dp.clip=0.9", "--policy", out)
    assert result.exit_code == 12 and "dp.max_clip" in result.stderr


def test_init_keeps_an_existing_policy(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    out = policy_file(tmp_path, "max_rounds: 3\n")
    result = invoke("policy", "init", ws, "--out", out)
    assert result.exit_code == 12 and "--force" in result.stderr
    assert out.read_text() == "max_rounds: 3\n"


def test_approve_lets_a_changed_plan_pass_and_keeps_the_comments(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    out = tmp_path / "policy.yaml"
    assert invoke("policy", "init", ws, "--out", out).exit_code == 0
    _, first = planned(ws)
    (ws / "task.py").write_text((ws / "task.py").read_text() + "\n# a change of code\n")
    result = invoke("policy", "check", ws, "--policy", out)
    assert result.exit_code == 12 and "approved_plans" in result.stderr

    result = invoke("policy", "approve", ws, "--policy", out)
    assert result.exit_code == 0, result.output
    _, second = planned(ws)
    assert f"approved: plan hash {second} added to {out} (2 plans approved)" in result.stdout
    assert load_policy(out).approved_plans == (first, second)
    assert "# Plans this site reviewed and approved" in out.read_text()
    assert invoke("policy", "check", ws, "--policy", out).exit_code == 0

    result = invoke("policy", "approve", ws, "--policy", out)
    assert result.exit_code == 0 and "already approved" in result.stdout
    assert load_policy(out).approved_plans == (first, second)


def test_approve_reports_the_rules_still_broken(tmp_path: Path) -> None:
    ws = workspace(tmp_path, rounds=90)
    out = policy_file(tmp_path, "# my rules\nmax_rounds: 50\n")
    result = invoke("policy", "approve", ws, "--policy", out)
    assert result.exit_code == 0, result.output
    assert "accepted any plan before" in result.stdout
    assert "still breaks 1 rule of the policy (max_rounds)" in result.stdout
    _, digest = planned(ws)
    assert load_policy(out).approved_plans == (digest,)
    assert out.read_text().startswith("# my rules\n")


def test_approve_rewrites_a_list_it_cannot_extend(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    other = "ef" * 32
    out = policy_file(tmp_path, f"# old comment\napproved_plans: [{other}]\nmax_rounds: 50\n")
    result = invoke("policy", "approve", ws, "--policy", out)
    assert result.exit_code == 0, result.output
    assert "comments were not kept" in result.stdout
    policy = load_policy(out)
    assert policy.approved_plans == (other, planned(ws)[1]) and policy.max_rounds == 50


def test_overrides_change_the_plan_that_is_checked(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    out = tmp_path / "policy.yaml"
    assert invoke("policy", "init", ws, "rounds=5", "--out", out).exit_code == 0
    assert invoke("policy", "check", ws, "rounds=5", "--policy", out).exit_code == 0
    result = invoke("policy", "check", ws, "--policy", out)
    assert result.exit_code == 12
    assert "approved_plans" in result.stderr and "max_rounds" in result.stderr


# ----------------------------------------------------------------- one place for a site's policy


@pytest.mark.process
def test_init_check_and_the_collaborator_use_the_same_policy_file(tmp_path: Path) -> None:
    """Real processes, as a data owner runs them: the policy `init` writes is the one
    `check` reads and the collaborator enforces, and each says which file it is."""
    ws = workspace(tmp_path)
    own = ws / "sites" / "site-01" / "policy.yaml"
    stray = policy_file(tmp_path, "max_rounds: 1000\n")  # ./policy.yaml: not the site's
    site = ("--name", "site-01")
    init = run_cli("policy", "init", str(ws), *site, cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert f"Wrote {own}" in init.stdout and own.is_file()
    assert f"reads it there: fedloom collaborator start {ws} --name site-01" in init.stdout
    check = run_cli("policy", "check", str(ws), "rounds=3", *site, cwd=tmp_path)
    assert check.returncode == 12 and f"site policy: {own}" in check.stdout
    start = run_cli(
        *("collaborator", "start", str(ws), "rounds=3", *site, "--aggregator", "localhost:1"),
        cwd=tmp_path,
    )
    assert start.returncode == 12, start.stdout + start.stderr
    assert f"site policy: {own}" in start.stdout
    assert f"breaks 1 rule of the site policy {own}" in start.stderr
    assert f"warning: {stray} is not read: this site's policy is {own}" in start.stderr


@pytest.mark.process
def test_a_collaborator_without_a_policy_says_so_on_its_screen(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    stray = policy_file(tmp_path, "max_rounds: 1\n")  # where `policy init` used to write it
    own = ws / "sites" / "site-01" / "policy.yaml"
    start = run_cli(
        *("collaborator", "start", str(ws), "--name", "site-01", "--aggregator", "localhost:1"),
        cwd=tmp_path,
    )
    assert start.returncode != 0  # it has no key: it stops before it connects
    assert (
        f"warning: no site policy ({own} does not exist): this site enforces nothing beyond "
        f"the plan; write one with `fedloom policy init {ws} --name site-01`"
    ) in start.stderr
    assert f"warning: {stray} is not read: this site looks for its policy at {own}" in start.stderr


def test_policy_commands_need_to_know_whose_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    policy_file(tmp_path, "max_rounds: 3\n")
    for command, option in (("check", "--policy"), ("approve", "--policy"), ("init", "--out")):
        result = invoke("policy", command, ws)
        assert result.exit_code == 2, result.output
        assert f"--name SITE for {ws}/sites/SITE/policy.yaml" in result.stderr
        assert f"is not read unless named: {option} policy.yaml" in result.stderr
    state = tmp_path / "state"
    result = invoke("policy", "init", ws, "--state", state)
    assert result.exit_code == 0 and (state / "policy.yaml").is_file()
    assert f"--name SITE --state {state}" in result.stdout
    result = invoke("policy", "approve", ws, "rounds=5", "--state", state)
    assert result.exit_code == 0 and f"site policy: {state / 'policy.yaml'}" in result.stdout
