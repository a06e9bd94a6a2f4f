"""The site policy: the data owner's own rules, which their collaborator enforces.

``policy.yaml`` never leaves the site. Before the collaborator reads any data it checks
the plan against it with :func:`check_policy`, and refuses the whole federation if any
rule is broken (:func:`policy_refusal`); the policy always wins over the plan. While
training it lets only the metrics the policy allows leave the site
(:func:`filter_metrics`).

Every check here is a pure function of the policy and the validated plan: no I/O, so
``fedloom policy check`` and the collaborator give the same verdict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, BeforeValidator, Field

from fedloom.core.errors import PolicyError
from fedloom.core.frozen import Frozen
from fedloom.core.strict_yaml import StrictLoader
from fedloom.core.validation import describe_error
from fedloom.docpages import doc_ref
from fedloom.privacy.analysis_rules import AnalysisRules, analysis_violations
from fedloom.privacy.settings import NoisePlacement

if TYPE_CHECKING:
    from fedloom.plan import Plan

POLICY_FILE = "policy.yaml"

_HASH = re.compile(r"[0-9a-f]{64}")


def _plan_hash(value: Any) -> Any:
    if not isinstance(value, str) or not _HASH.fullmatch(value.strip().lower()):
        raise ValueError(
            "must be a plan hash: 64 hexadecimal digits, as `fedloom plan show` prints it "
            f"(got {value!r})"
        )
    return value.strip().lower()


PlanHash = Annotated[str, BeforeValidator(_plan_hash)]
Flag = Annotated[bool, Field(strict=True)]
AtLeastZero = Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, strict=True, allow_inf_nan=False)]
Probability = Annotated[float, Field(gt=0, lt=1, strict=True, allow_inf_nan=False)]


class DPRules(Frozen):
    """Rules on the plan's ``privacy.dp`` (user-level DP-FedAvg). The bounds apply
    whenever the plan uses DP; ``required`` says whether it must."""

    required: Flag = True
    min_noise_multiplier: AtLeastZero | None = None
    max_clip: Positive | None = None
    max_epsilon: Positive | None = None  # the plan must set epsilon_budget <= this
    max_delta: Probability | None = None
    distributed_noise: Flag = False  # true: the sites add the noise, never the aggregator


class DPSGDRules(Frozen):
    """Rules on the plan's ``privacy.dp_sgd`` (sample-level DP-SGD in training)."""

    required: Flag = True
    min_noise_multiplier: AtLeastZero | None = None
    max_grad_norm: Positive | None = None


class SecureAggregationRules(Frozen):
    """Rules on the plan's ``privacy.secure_aggregation``."""

    required: Flag = True
    min_threshold: Annotated[float, Field(gt=0, le=1, strict=True, allow_inf_nan=False)] | None = (
        None
    )
    min_bits: Literal[32, 64] | None = None


class MetricsRules(Frozen):
    """Which of this site's metrics may leave it."""

    allowed: tuple[str, ...] | None = None  # None: every metric the task reports
    sample_level: Flag = True  # false: nothing computed on this site's samples leaves it


class Policy(Frozen):
    """``policy.yaml``. An absent section sets no rule."""

    version: Literal[1] = 1
    approved_plans: tuple[PlanHash, ...] | None = None  # None: any plan (a warning)
    max_rounds: Annotated[int, Field(gt=0, strict=True)] | None = None
    dp: DPRules | None = None
    dp_sgd: DPSGDRules | None = None
    secure_aggregation: SecureAggregationRules | None = None
    metrics: MetricsRules | None = None
    analysis: AnalysisRules | None = None  # None: no federated analysis may run here


_SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): Policy,
    ("dp",): DPRules,
    ("dp_sgd",): DPSGDRules,
    ("secure_aggregation",): SecureAggregationRules,
    ("metrics",): MetricsRules,
    ("analysis",): AnalysisRules,
}


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` is its key in the policy (``dp.max_clip``); ``message``
    says what the plan has, what the policy demands, and how to fix it."""

    rule: str
    message: str


# ----------------------------------------------------------------- loading


def load_policy(path: Path) -> Policy:
    """The validated policy in ``path``, or a :class:`PolicyError` listing every problem."""
    path = Path(path)
    if path.is_dir():
        raise PolicyError(f"{path} is a folder, not a policy file")
    if not path.is_file():
        raise PolicyError(
            f"policy file {path} not found; write one with "
            f"`fedloom policy init WORKSPACE --out {path}`"
        )
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)  # noqa: S506
    except UnicodeDecodeError as err:
        raise _invalid(path, [f"not UTF-8 text ({err.reason} at byte {err.start})"]) from err
    except yaml.YAMLError as err:
        raise _invalid(path, [f"not valid YAML: {err}"]) from err
    return validate_policy(raw, source=str(path))


def validate_policy(raw: Any, *, source: str = POLICY_FILE) -> Policy:
    """``raw`` (parsed YAML) as a :class:`Policy`, or a :class:`PolicyError` listing every
    problem with its path (``dp.min_noise_multiplier: must be >= 0 (got -1)``)."""
    if raw is None:
        # an empty file would approve every plan: more likely a mistake than a choice
        raise _invalid(source, ["the file is empty; write one with `fedloom policy init`"])
    if not isinstance(raw, dict):
        raise _invalid(source, ["a policy must be a mapping of keys to values"])
    try:
        return Policy.model_validate(raw)
    except pydantic.ValidationError as err:
        raise _invalid(source, [_problem(e) for e in err.errors()]) from err


def _problem(error: Any) -> str:
    if error["type"] == "tuple_type":
        path = ".".join(str(p) for p in error["loc"])
        return f"{path}: must be a list (got {error.get('input')!r})"
    if error["type"] != "extra_forbidden":
        return describe_error(error)
    loc = tuple(str(p) for p in error["loc"])
    section = _SECTIONS.get(loc[:-1])
    takes = "" if section is None else f"; this section takes {', '.join(section.model_fields)}"
    return f"{'.'.join(loc)}: unknown key{takes}"


def _invalid(source: str | Path, problems: Sequence[str]) -> PolicyError:
    noun = "problem" if len(problems) == 1 else "problems"
    lines = "\n".join(f"  - {p}" for p in problems)
    return PolicyError(
        f"{source}: {len(problems)} {noun}\n{lines}",
        hint=f"every key of a policy file is described in {doc_ref('cli/policy')}",
    )


# ----------------------------------------------------------------- checking


def check_policy(policy: Policy, plan: Plan, plan_hash: str) -> list[Violation]:
    """Every rule of ``policy`` that ``plan`` (whose hash is ``plan_hash``) breaks, in the
    order of the policy file; empty when the plan is allowed."""
    found: list[Violation] = []
    if policy.approved_plans is not None and plan_hash.lower() not in policy.approved_plans:
        found.append(_not_approved(plan_hash, len(policy.approved_plans)))
    if policy.max_rounds is not None and plan.rounds > policy.max_rounds:
        found.append(_above("max_rounds", "rounds", plan.rounds, policy.max_rounds))
    if plan.analysis is not None:  # its own noise; dp's rules apply to it
        broken = analysis_violations(policy.analysis, policy.dp, plan)
        found += [Violation(b.rule, b.message) for b in broken]
    elif policy.dp is not None:
        found += _dp_violations(policy.dp, plan)
    if policy.dp_sgd is not None and plan.analysis is None:
        found += _dp_sgd_violations(policy.dp_sgd, plan)
    if policy.secure_aggregation is not None:
        found += _secure_aggregation_violations(policy.secure_aggregation, plan)
    return found


def _dp_violations(rules: DPRules, plan: Plan) -> Iterable[Violation]:
    dp = plan.privacy.dp
    if dp is None:
        if rules.required:
            demands = _demands(
                ("noise_multiplier", ">=", rules.min_noise_multiplier),
                ("clip", "<=", rules.max_clip),
                ("epsilon_budget", "<=", rules.max_epsilon),
                ("delta", "<=", rules.max_delta),
                ("noise:", "distributed", True if rules.distributed_noise else None),
            )
            yield _missing("dp", "differential privacy", demands)
        return
    if rules.min_noise_multiplier is not None and dp.noise_multiplier < rules.min_noise_multiplier:
        yield _below(
            "dp.min_noise_multiplier",
            "privacy.dp.noise_multiplier",
            dp.noise_multiplier,
            rules.min_noise_multiplier,
        )
    if rules.max_clip is not None and dp.adaptive_clip is not None:
        yield Violation(
            "dp.max_clip",
            "the plan's privacy.dp.adaptive_clip lets the clip bound grow during training "
            f"past its start, the policy allows at most {_num(rules.max_clip)}: remove "
            f"privacy.dp.adaptive_clip and set privacy.dp.clip <= {_num(rules.max_clip)} in "
            "federation.yaml (or the data owner removes dp.max_clip from the site policy)",
        )
    elif rules.max_clip is not None and dp.clip > rules.max_clip:
        yield _above("dp.max_clip", "privacy.dp.clip", dp.clip, rules.max_clip)
    if rules.max_epsilon is not None:
        if dp.epsilon_budget is None:
            yield Violation(
                "dp.max_epsilon",
                "the plan sets no privacy.dp.epsilon_budget, so nothing stops its privacy "
                f"loss growing round after round, the policy allows at most epsilon "
                f"{_num(rules.max_epsilon)}: set privacy.dp.epsilon_budget <= "
                f"{_num(rules.max_epsilon)} in federation.yaml (or the data owner removes "
                "dp.max_epsilon from the site policy)",
            )
        elif dp.epsilon_budget > rules.max_epsilon:
            yield _above(
                "dp.max_epsilon", "privacy.dp.epsilon_budget", dp.epsilon_budget, rules.max_epsilon
            )
    if rules.max_delta is not None and dp.delta > rules.max_delta:
        yield _above("dp.max_delta", "privacy.dp.delta", dp.delta, rules.max_delta)
    if rules.distributed_noise and dp.noise is not NoisePlacement.DISTRIBUTED:
        needs = "" if plan.privacy.secure_aggregation else " and add privacy.secure_aggregation"
        yield Violation(
            "dp.distributed_noise",
            "the plan's privacy.dp.noise is central (the aggregator adds the noise, so it "
            "sees the sum before noise), the policy demands distributed noise (each site "
            f"adds its share): set privacy.dp.noise: distributed{needs} in federation.yaml "
            "(or the data owner sets dp.distributed_noise: false in the site policy)",
        )


def _dp_sgd_violations(rules: DPSGDRules, plan: Plan) -> Iterable[Violation]:
    sgd = plan.privacy.dp_sgd
    if sgd is None:
        if rules.required:
            demands = _demands(
                ("noise_multiplier", ">=", rules.min_noise_multiplier),
                ("max_grad_norm", "<=", rules.max_grad_norm),
            )
            yield _missing("dp_sgd", "sample-level DP-SGD in training", demands)
        return
    if rules.min_noise_multiplier is not None and sgd.noise_multiplier < rules.min_noise_multiplier:
        yield _below(
            "dp_sgd.min_noise_multiplier",
            "privacy.dp_sgd.noise_multiplier",
            sgd.noise_multiplier,
            rules.min_noise_multiplier,
        )
    if rules.max_grad_norm is not None and sgd.max_grad_norm > rules.max_grad_norm:
        yield _above(
            "dp_sgd.max_grad_norm",
            "privacy.dp_sgd.max_grad_norm",
            sgd.max_grad_norm,
            rules.max_grad_norm,
        )


def _secure_aggregation_violations(
    rules: SecureAggregationRules, plan: Plan
) -> Iterable[Violation]:
    sa = plan.privacy.secure_aggregation
    if sa is None:
        if rules.required:
            demands = _demands(
                ("threshold", ">=", rules.min_threshold),
                ("bits:", "64", True if rules.min_bits == 64 else None),
            )
            yield _missing(
                "secure_aggregation",
                "secure aggregation (without it the aggregator sees this site's update)",
                demands,
            )
        return
    if rules.min_threshold is not None and sa.threshold < rules.min_threshold:
        yield _below(
            "secure_aggregation.min_threshold",
            "privacy.secure_aggregation.threshold",
            sa.threshold,
            rules.min_threshold,
        )
    if rules.min_bits is not None and sa.bits < rules.min_bits:
        yield Violation(
            "secure_aggregation.min_bits",
            f"the plan's privacy.secure_aggregation.bits is {sa.bits}, the policy demands at "
            f"least {rules.min_bits}: set privacy.secure_aggregation.bits: {rules.min_bits} "
            "in federation.yaml (or the data owner lowers secure_aggregation.min_bits in the "
            "site policy)",
        )


def _not_approved(plan_hash: str, approved: int) -> Violation:
    what = (
        "it approves no plan yet"
        if approved == 0
        else f"it approves {approved} other plan{'s' if approved > 1 else ''}; a change to "
        "federation.yaml, an override or a .py file gives a new hash"
    )
    return Violation(
        "approved_plans",
        f"the plan hash {plan_hash} is not in the policy's approved_plans ({what}): the data "
        "owner must review this plan (`fedloom plan show WORKSPACE`) and approve it with "
        "`fedloom policy approve WORKSPACE --name SITE`, which adds the hash",
    )


def _below(rule: str, key: str, has: float, least: float) -> Violation:
    return Violation(
        rule,
        f"the plan's {key} is {_num(has)}, the policy demands at least {_num(least)}: set "
        f"{key} >= {_num(least)} in federation.yaml (or the data owner lowers {rule} in the "
        "site policy)",
    )


def _above(rule: str, key: str, has: float, most: float) -> Violation:
    return Violation(
        rule,
        f"the plan's {key} is {_num(has)}, the policy allows at most {_num(most)}: set "
        f"{key} <= {_num(most)} in federation.yaml (or the data owner raises {rule} in the "
        "site policy)",
    )


def _missing(section: str, what: str, demands: str) -> Violation:
    return Violation(
        f"{section}.required",
        f"the plan has no privacy.{section} section, the policy demands {what}: add "
        f"privacy.{section} to federation.yaml{' with ' + demands if demands else ''} (or "
        f"the data owner sets {section}.required: false in the site policy)",
    )


def _demands(*rules: tuple[str, str, Any]) -> str:
    """``noise_multiplier >= 0.8, clip <= 1`` for the rules that are set."""
    parts = []
    for key, op, limit in rules:
        if limit is True:
            parts.append(f"{key} {op}")
        elif limit is not None:
            parts.append(f"{key} {op} {_num(limit)}")
    return ", ".join(parts)


def _num(value: float) -> str:
    """A number as short as it can be written without changing its value."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def policy_refusal(violations: Sequence[Violation], *, source: str | None = None) -> PolicyError:
    """One :class:`PolicyError` listing every violation, each with its fix. ``source`` names
    the policy file in the message."""
    if not violations:
        raise ValueError("policy_refusal needs at least one violation")
    noun = "rule" if len(violations) == 1 else "rules"
    of = f"the site policy {source}" if source else "the site policy"
    lines = "\n".join(f"  - {v.rule}: {v.message}" for v in violations)
    return PolicyError(
        f"the plan breaks {len(violations)} {noun} of {of}; this site takes no part in "
        f"it and reads none of its data\n{lines}",
        hint="the site policy always wins: change federation.yaml as each rule says, or ask "
        "the data owner to change the policy",
    )


def policy_warnings(policy: Policy) -> tuple[str, ...]:
    """What a policy leaves open that a data owner most likely meant to close."""
    found = []
    if policy.approved_plans is None:
        found.append(
            "the policy has no approved_plans, so it accepts any plan, whatever its task "
            "code: approve the plans this site reviewed with `fedloom policy approve`"
        )
    if policy.dp is not None and policy.dp.required and policy.dp.min_noise_multiplier is None:
        found.append(
            "dp.required without dp.min_noise_multiplier accepts noise_multiplier: 0 (no "
            "noise at all): set dp.min_noise_multiplier"
        )
    return tuple(found)


# ----------------------------------------------------------------- metrics


def filter_metrics(
    policy: Policy, metrics: Mapping[str, float]
) -> tuple[dict[str, float], tuple[str, ...]]:
    """The metrics that may leave the site, and the names of those withheld (in the
    order of ``metrics``)."""
    rules = policy.metrics
    if rules is None:
        return dict(metrics), ()
    if not rules.sample_level:
        return {}, tuple(metrics)
    allowed = None if rules.allowed is None else frozenset(rules.allowed)
    kept = {k: v for k, v in metrics.items() if allowed is None or k in allowed}
    return kept, tuple(k for k in metrics if k not in kept)
