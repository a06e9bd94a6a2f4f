"""The plan: ``federation.yaml``, validated, with ``key=value`` overrides and a hash.

Every problem is collected and reported at once with its path and a hint
(``strategy.server_lr: must be > 0 (got -1)``), never as a traceback. The *plan hash*
is the sha256 of the validated plan as canonical JSON plus every ``.py`` file of the
workspace: the contract a data owner approves and every site checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
import yaml

from fedloom.compression.settings import compression_problems
from fedloom.core.errors import PlanError, WorkspaceError
from fedloom.core.strict_yaml import MAX_NESTING, RefusedYAML, StrictLoader, where
from fedloom.core.validation import shown
from fedloom.plan.messages import describe_error
from fedloom.plan.schema import (
    MAX_PLAN_BYTES,
    PLAN_FILE,
    Plan,
    StrategyPlan,
    device_problem,
)
from fedloom.privacy.settings import privacy_problems
from fedloom.store.model_file import model_file
from fedloom.workspace import WorkspaceCode, base_model_digest, base_model_folder, file_digest

if TYPE_CHECKING:
    from fedloom.strategies.base import Strategy

# ----------------------------------------------------------------- loading


def read_plan_file(workspace: Path) -> dict[str, Any]:
    path = workspace / PLAN_FILE
    if not workspace.is_dir():
        raise WorkspaceError(
            f"{workspace} is not a folder", hint="create one with `fedloom init DIR`"
        )
    if not path.is_file():
        raise WorkspaceError(
            f"{path} not found", hint="a workspace holds federation.yaml; see `fedloom init`"
        )
    with path.open("rb") as f:
        data = f.read(MAX_PLAN_BYTES + 1)
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(
            [f"the file is larger than {MAX_PLAN_BYTES} bytes (1 MiB), the most a plan takes"],
            source=str(path),
        )
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=StrictLoader)  # noqa: S506
    except UnicodeDecodeError as err:
        raise PlanError(
            [f"not UTF-8 text ({err.reason} at byte {err.start})"], source=str(path)
        ) from err
    except RefusedYAML as err:
        raise PlanError([f"{err.problem}{where(err)}"], source=str(path)) from err
    except yaml.YAMLError as err:
        raise PlanError([f"not valid YAML: {err}"], source=str(path)) from err
    except (ValueError, RecursionError) as err:  # a value yaml itself cannot build
        raise PlanError([f"cannot read the file: {err}"], source=str(path)) from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PlanError(["the plan must be a mapping of keys to values"], source=str(path))
    return raw


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {shown(item)}: expected key=value, e.g. rounds=5")
            continue
        if key.count(".") >= MAX_NESTING:
            problems.append(f"override {shown(item)}: a key at most {MAX_NESTING} deep")
            continue
        try:
            value = yaml.load(text, Loader=StrictLoader) if text.strip() else ""  # noqa: S506
        except RefusedYAML as err:
            problems.append(f"override {shown(item)}: {err.problem}")
            continue
        except (yaml.YAMLError, ValueError, RecursionError):
            value = text
        parsed.append(([p for p in key.strip().split(".")], value))
    if problems:
        raise PlanError(problems, source="overrides")
    return parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``raw`` with each ``a.b.c=value`` set. Changing ``strategy.name`` drops the old
    strategy's parameters (unless they are overridden too)."""
    out: dict[str, Any] = json.loads(json.dumps(raw, default=str))
    items = parse_overrides(overrides)
    strategy = out.get("strategy")
    for path, value in items:
        if path == ["strategy", "name"] and isinstance(strategy, dict):
            if strategy.get("name", "fedavg") != value:
                out["strategy"] = {"name": value}
    for path, value in items:
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def validate_plan(raw: Mapping[str, Any], *, source: str = PLAN_FILE) -> Plan:
    """The validated plan, or a :class:`PlanError` listing every problem."""
    problems: list[str] = []
    plan: Plan | None = None
    try:
        plan = Plan.model_validate(raw)
    except pydantic.ValidationError as err:
        problems.extend(describe_error(e) for e in err.errors())
    strategy_raw = raw.get("strategy") if isinstance(raw, Mapping) else {}
    strategy_problems, strategy = _check_strategy(
        strategy_raw if isinstance(strategy_raw, Mapping) else {}
    )
    problems.extend(strategy_problems)
    if problems:
        raise PlanError(problems, source=source)
    assert plan is not None and strategy is not None  # noqa: S101 - no problems: both valid
    return _spelled_out(plan, strategy, source)


def _spelled_out(plan: Plan, strategy: Strategy, source: str) -> Plan:
    """The plan with every strategy parameter spelled out, defaults included, so that
    writing a default explicitly does not change the plan hash."""
    from fedloom.strategies import parameters_of

    params = parameters_of(strategy)
    per_round = plan.per_round
    problems = privacy_problems(
        plan.privacy,
        strategy=plan.strategy.name,
        needs_updates=strategy.needs_updates,
        per_round=per_round,
        max_samples=plan.training.max_samples,
    )
    problems += compression_problems(plan.compression, plan.privacy)
    if plan.training.personal is not None and plan.privacy.dp_sgd is not None:
        problems.append(
            "training.personal: the personal model trains without DP-SGD's noise, and its "
            "validation figures leave the site, which privacy.dp_sgd's guarantee does not "
            "cover; remove one of the two"
        )
    if problems:
        raise PlanError(problems, source=source)
    if strategy.min_updates() > per_round:
        selected = params.get("num_selected")
        field = "num_selected" if selected and selected > per_round else "num_byzantine"
        raise PlanError(
            [
                f"strategy.{field}: {plan.strategy.name} with these parameters needs at "
                f"least {strategy.min_updates()} updates a round, but only {per_round} sites "
                "take part in a round; lower it, or add sites"
            ],
            source=source,
        )
    return plan.model_copy(update={"strategy": StrategyPlan(name=plan.strategy.name, **params)})


def _check_strategy(strategy: Mapping[str, Any]) -> tuple[list[str], Strategy | None]:
    """The problems of the plan's strategy section, and the strategy if it has none."""
    from fedloom.strategies import strategy_problems

    name = strategy.get("name", "fedavg")
    return strategy_problems(name, {k: v for k, v in strategy.items() if k != "name"})


def load_plan(workspace: str | Path, overrides: Sequence[str] = ()) -> Plan:
    """Read ``federation.yaml`` of ``workspace``, apply overrides, validate."""
    ws = Path(workspace)
    raw = apply_overrides(read_plan_file(ws), overrides)
    source = str(ws / PLAN_FILE) + (" with overrides" if overrides else "")
    return validate_plan(raw, source=source)


def attack_warnings(plan: Plan, attackers: int) -> tuple[str, ...]:
    """Warnings, not errors: what the plan's strategy cannot withstand when ``attackers``
    sites of the roster attack (``fedloom simulate --attackers``). The worst round has
    ``min(attackers, plan.per_round)`` of them among its sites; the strategy is warned
    about when it withstands fewer (:meth:`~fedloom.strategies.base.Strategy.tolerated`).
    """
    from fedloom.strategies import build_strategy

    if attackers <= 0:
        return ()
    strategy = build_strategy(plan.strategy.name, plan.strategy_params)
    n = plan.per_round
    bad = min(attackers, n)
    held = strategy.tolerated(n)
    if bad <= held:
        return ()
    name, params = plan.strategy.name, plan.strategy_params
    attack = f"{bad} of the {n} sites in a round attack"
    instead = "filtered-mean or geometric-median, which need no count of attackers"
    if 2 * bad >= n:
        return (
            f"strategy.name: {attack}: no robust strategy withstands half the updates or "
            "more; add honest sites or attack fewer",
        )
    if not strategy.needs_updates:
        return (
            f"strategy.name: {name} averages every update, so one attacking site moves the "
            f"model as far as it likes, and {attack}; use a robust strategy: {instead}",
        )
    if name == "trimmed-mean":
        return (
            f"strategy.trim_fraction: {params['trim_fraction']} trims {held} of the {n} "
            f"updates from each end of every coordinate, but {attack}; set it to at least "
            f"{bad / n:.3g} ({bad}/{n}), or use filtered-mean, which needs no count of "
            "attackers",
        )
    if name in ("krum", "multi-krum"):
        selected = params.get("num_selected")
        if selected is not None and n - selected < bad <= params["num_byzantine"]:
            return (
                f"strategy.num_selected: multi-krum keeps {selected} of the {n} updates, so "
                f"it averages in at least {bad - (n - selected)} attacking update(s) when "
                f"{attack}; set it to at most {n - bad}, or leave it null",
            )
        return (
            f"strategy.num_byzantine: {name} withstands num_byzantine = "
            f"{params['num_byzantine']} attacking sites, but {attack}; set it to at least "
            f"{bad} (which needs {2 * bad + 3} sites a round), or use {instead}",
        )
    return (
        f"strategy.name: {name} withstands {held} attacking site(s) of the {n} in a round, "
        f"but {attack}",
    )


def plan_hash(plan: Plan, workspace: str | Path | WorkspaceCode) -> str:
    """sha256 over the canonical JSON of ``plan``, every ``.py`` file of the workspace
    and, when the plan names a base model (``model.base``), every file of its folder.

    Pass the :class:`WorkspaceCode` the task is loaded from to hash exactly the bytes
    that run; a folder is read afresh."""
    code = workspace if isinstance(workspace, WorkspaceCode) else WorkspaceCode.read(workspace)
    h = hashlib.sha256()
    h.update(b"fedloom-plan-v1\0")
    h.update(plan.canonical_json().encode())
    code.update(h)
    if plan.model.base is not None:
        folder = base_model_folder(code.root, plan.model.base)
        h.update(b"\0base\0" + base_model_digest(folder).encode())
    initial = plan.initial_model_path(code.root)
    if initial is not None:
        h.update(b"\0initial\0" + file_digest(model_file(initial)).encode())
    return h.hexdigest()


def plan_covers(plan: Plan, workspace: str | Path | WorkspaceCode) -> str:
    """What the plan hash covers, in words: the plan, the workspace's code and, when the
    plan names one, the base model with the start of its digest (for a refusal that says
    where two sides may differ)."""
    what = "federation.yaml, the workspace's .py files"
    if plan.model.base is None:
        return what
    code = workspace if isinstance(workspace, WorkspaceCode) else WorkspaceCode.read(workspace)
    digest = base_model_digest(base_model_folder(code.root, plan.model.base))
    return f"{what} and the base model {plan.model.base} (its files' digest {digest[:16]}…)"


__all__ = [
    "MAX_NESTING",
    "MAX_PLAN_BYTES",
    "PLAN_FILE",
    "Plan",
    "TRAIN_SETTINGS_ON_THE_WIRE",
    "apply_overrides",
    "attack_warnings",
    "device_problem",
    "load_plan",
    "parse_overrides",
    "plan_covers",
    "plan_hash",
    "read_plan_file",
    "validate_plan",
]
