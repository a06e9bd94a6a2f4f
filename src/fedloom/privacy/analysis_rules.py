"""The site policy's rules on a federated analysis (the plan's ``analysis:`` section):
which columns and statistics may leave the site, the least ``min_count`` it accepts,
and, through the policy's ``dp:`` rules, the noise and the epsilon budget (the same
rules, accountant and count as training's).

A policy without an ``analysis:`` section lets no statistic leave: a data owner who
wrote rules for training has not agreed to release counts. Pure functions, as the rest
of the policy's checks (:mod:`fedloom.privacy.policy`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from fedloom.core.frozen import Frozen

if TYPE_CHECKING:
    from fedloom.plan import Plan
    from fedloom.privacy.policy import DPRules

# the kinds of statistic, as a plan asks for them and a policy allows them
StatKind = Literal["count", "sum", "mean", "variance", "histogram", "quantiles", "min", "max"]


class AnalysisRules(Frozen):
    """What of a federated analysis may leave this site."""

    columns: tuple[str, ...] = ()  # the columns whose statistics may leave
    statistics: tuple[StatKind, ...] = ("count",)  # the kinds of statistic that may
    # the least analysis.min_count the plan may set: no smaller cell leaves
    min_count: Annotated[int, Field(ge=1, le=1_000_000, strict=True)] = 10


@dataclass(frozen=True)
class Broken:
    """One broken rule (as :class:`~fedloom.privacy.policy.Violation`)."""

    rule: str
    message: str


def analysis_violations(
    rules: AnalysisRules | None, dp: DPRules | None, plan: Plan
) -> Iterable[Broken]:
    """Every rule the plan's analysis breaks (``dp``: the policy's DP rules)."""
    query = plan.analysis
    if query is None:
        return
    owner = "or the data owner changes the site policy"
    if rules is None:
        yield Broken(
            "analysis",
            "the plan is a federated analysis and the site policy has no analysis section, "
            "so no statistic may leave this site: the data owner adds analysis: {columns: "
            "[...], statistics: [...], min_count: N} to the site policy",
        )
        return
    for stat in query.statistics:
        if stat.column is not None and stat.column not in rules.columns:
            allowed = ", ".join(rules.columns) or "none"
            yield Broken(
                "analysis.columns",
                f"the plan's {stat.label} reads column {stat.column!r}, which may not leave "
                f"this site (allowed: {allowed}): remove it from analysis.statistics ({owner}: "
                "analysis.columns)",
            )
        if stat.stat not in rules.statistics:
            yield Broken(
                "analysis.statistics",
                f"the plan asks for {stat.label}: this site releases no {stat.stat} (allowed: "
                f"{', '.join(rules.statistics)}): remove it from analysis.statistics ({owner}: "
                "analysis.statistics)",
            )
    if query.min_count < rules.min_count:
        yield Broken(
            "analysis.min_count",
            f"the plan's analysis.min_count is {query.min_count}, the policy demands at least "
            f"{rules.min_count}: set analysis.min_count >= {rules.min_count} in "
            f"federation.yaml ({owner}: analysis.min_count)",
        )
    if dp is not None:
        yield from _dp(dp, plan, owner)


def _dp(rules: DPRules, plan: Plan, owner: str) -> Iterable[Broken]:
    assert plan.analysis is not None  # noqa: S101 - checked by the caller
    noise = plan.analysis.dp
    if noise is None:
        if rules.required:
            yield Broken(
                "dp.required",
                f"the plan's analysis adds no noise, the policy demands differential privacy: "
                f"add analysis.dp: {{noise_multiplier: ..., epsilon_budget: ...}} ({owner}: "
                "dp.required: false)",
            )
        return
    least = rules.min_noise_multiplier
    if least is not None and noise.noise_multiplier < least:
        yield Broken(
            "dp.min_noise_multiplier",
            f"the plan's analysis.dp.noise_multiplier is {noise.noise_multiplier:g}, the policy "
            f"demands at least {least:g}: raise it ({owner})",
        )
    most = rules.max_epsilon
    if most is not None and (noise.epsilon_budget is None or noise.epsilon_budget > most):
        yield Broken(
            "dp.max_epsilon",
            f"the plan's analysis.dp.epsilon_budget is {noise.epsilon_budget}, the policy "
            f"allows at most {most:g}: set analysis.dp.epsilon_budget <= {most:g} ({owner})",
        )
    if rules.max_delta is not None and noise.delta > rules.max_delta:
        yield Broken(
            "dp.max_delta",
            f"the plan's analysis.dp.delta is {noise.delta:g}, the policy allows at most "
            f"{rules.max_delta:g}: lower it ({owner})",
        )
