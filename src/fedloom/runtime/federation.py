"""The plan's federation as the aggregator's round loop sees it: the one mapping from a
:class:`~fedloom.plan.Plan` to a :class:`~fedloom.aggregator.FederationConfig`, shared
by the simulation and the deployed server."""

from __future__ import annotations

from fedloom.aggregator import FederationConfig
from fedloom.plan import Plan


def federation_config(plan: Plan) -> FederationConfig:
    roster = plan.roster
    return FederationConfig(
        roster=roster,
        rounds=plan.rounds,
        sites_per_round=plan.per_round,
        min_fraction=plan.deadline.min_fraction,
        round_deadline=plan.deadline.round_seconds,
        max_retries=plan.deadline.retries,
        max_samples=plan.training.max_samples,
        seed=plan.seed,
        settings=plan.train_settings(),
        final_evaluation=plan.evaluation.final,
        compression=plan.compression.settings(),
        contribution_proxy=plan.evaluation.contributions,
    )
