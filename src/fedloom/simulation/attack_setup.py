"""A simulated attack from the command line (``--attack``, ``--attackers``): checked
against the plan, its attacking sites chosen, before anything runs."""

from __future__ import annotations

from fedloom.attacks import Attack, AttackKind, choose_attackers, parse_attack
from fedloom.core.errors import PlanError
from fedloom.data.datasets import REGRESSION_DATASETS
from fedloom.plan import Plan
from fedloom.simulation.options import SimulationOptions


def make_attack(plan: Plan, options: SimulationOptions) -> Attack | None:
    if not options.attack and options.attackers <= 0:
        return None
    if not options.attack or options.attackers <= 0:
        raise PlanError(
            ["--attack and --attackers go together: name the attack and how many sites run it"],
            source="command line",
        )
    try:
        kind, factor = parse_attack(options.attack)
        attackers = choose_attackers(plan.roster, options.attackers, plan.seed)
    except ValueError as err:
        raise PlanError([f"--attack: {err}"], source="command line") from err
    if kind is AttackKind.LABEL_FLIP and plan.data.dataset in REGRESSION_DATASETS:
        raise PlanError(
            [
                f"--attack label-flip: flips class labels, but {plan.data.dataset} is a "
                "regression dataset (its targets are numbers); use sign-flip, scale:K or "
                "gaussian[:SIGMA]"
            ],
            source="command line",
        )
    return Attack(kind, factor, attackers)
