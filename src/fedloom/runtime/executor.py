"""What a site does with one instruction, on its own data. Pure of transport.

Train: evaluate the received global model on the local validation split, train from
it, evaluate the locally trained model, and return the *delta* ``w_local - w_round``.
Evaluate: evaluate the global model only. A plan with ``evaluation.each_round: false``
skips both evaluations of a training round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedloom.attacks import Attack, AttackKind, flip_labels, poison_update
from fedloom.errors import TaskError
from fedloom.records import (
    DPSGDSettings,
    EvalOutput,
    Instruction,
    InstructionKind,
    SiteAnswer,
    TrainOutput,
)
from fedloom.rng import generator, int_seed, select_sites
from fedloom.tasks.base import SiteContext, SiteData, Task
from fedloom.tasks.dp_sgd import require_no_dp_sgd
from fedloom.weights import Weights, check_compatible, read_only, specs_of, subtract

if TYPE_CHECKING:
    from fedloom.plan import Plan


def dp_sgd_of(plan: Plan, site: str, round: int) -> tuple[DPSGDSettings | None, int]:
    """The plan's sample-level DP-SGD for ``site`` in ``round``, and how many training
    rounds up to this one selected the site (an upper bound on those it trained: what
    its accountant composes; selection depends only on the plan, so it is the same
    wherever and whenever it is computed)."""
    dp = plan.privacy.dp_sgd
    if dp is None:
        return None, 1
    roster = list(plan.roster)
    selected = sum(
        1
        for r in range(1, min(round, plan.rounds) + 1)
        if site in select_sites(roster, plan.per_round, plan.seed, r)
    )
    settings = DPSGDSettings(
        dp.noise_multiplier, dp.max_grad_norm, dp.delta, plan.privacy.accountant
    )
    return settings, max(1, selected)


def execute(
    task: Task,
    instruction: Instruction,
    weights: Weights,
    data: SiteData,
    *,
    site: str,
    index: int,
    plan_seed: int,
    num_classes: int = 0,
    attack: Attack | None = None,
    dp_sgd: DPSGDSettings | None = None,
    rounds_selected: int = 1,
) -> SiteAnswer:
    weights = read_only(weights)  # a task that writes into them fails the same in every mode
    attacking = attack is not None and site in attack.attackers
    metrics: dict[str, float] = {}
    training = instruction.kind is not InstructionKind.EVALUATE
    evaluating = not training or instruction.settings.evaluate
    if evaluating:
        seen = _evaluated(task.evaluate(weights, data.x_val, data.y_val))
        metrics.update({f"global_{k}": float(v) for k, v in seen.metrics.items()})
        metrics["val_samples"] = float(seen.num_samples)
        if not training:
            return SiteAnswer(seen.num_samples, metrics, None)

    if attacking and attack is not None and attack.kind is AttackKind.LABEL_FLIP:
        data = SiteData(
            data.x_train, flip_labels(data.y_train, num_classes), data.x_val, data.y_val
        )
    context = SiteContext(
        site,
        index,
        instruction.round,
        int_seed(plan_seed, instruction.round, site, "train"),
        options=dict(instruction.config),  # the strategy's configure() keys for this round
        dp_sgd=dp_sgd,
        rounds_selected=rounds_selected,
    )
    if not getattr(task, "supports_dp_sgd", False):
        require_no_dp_sgd(context, type(task).__name__)
    out = task.train(weights, data, instruction.settings, context)
    if not isinstance(out, TrainOutput):
        raise TaskError(
            f"train must return TrainOutput(weights, num_samples, metrics), "
            f"got {type(out).__name__}"
        )
    try:
        check_compatible(out.weights, specs_of(weights))
    except Exception as err:
        raise TaskError(f"train returned weights that differ from the model: {err}") from err
    if evaluating:
        local = _evaluated(task.evaluate(out.weights, data.x_val, data.y_val))
        metrics.update({f"local_{k}": float(v) for k, v in local.metrics.items()})
    metrics.update({k: float(v) for k, v in out.metrics.items()})
    delta = subtract(out.weights, weights)
    if attacking and attack is not None:
        rng = generator(plan_seed, instruction.round, site, "attack")
        delta = poison_update(delta, attack, rng)
    return SiteAnswer(int(out.num_samples), metrics, delta)


def _evaluated(out: object) -> EvalOutput:
    if not isinstance(out, EvalOutput):
        raise TaskError(
            f"evaluate must return EvalOutput(num_samples, metrics), got {type(out).__name__}"
        )
    return out
