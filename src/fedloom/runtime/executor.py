"""What a site does with one instruction, on its own data. Pure of transport.

Train: evaluate the received global model on the local validation split, train from
it, evaluate the locally trained model, and return the *delta* ``w_local - w_round``.
Evaluate: evaluate the global model only. A plan with ``evaluation.each_round: false``
skips both evaluations of a training round.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedloom.core.errors import TaskError
from fedloom.core.records import (
    DPSGDSettings,
    EvalOutput,
    Instruction,
    InstructionKind,
    LoopSettings,
    PersonalSettings,
    SiteAnswer,
    TrainOutput,
)
from fedloom.core.rng import int_seed, select_sites
from fedloom.core.weights import Weights, check_compatible, read_only, specs_of, subtract
from fedloom.runtime.personal import kept_personal, personal_metrics, train_personal
from fedloom.runtime.scaffold_site import site_variates
from fedloom.store.checkpoint import load_weights, save_weights
from fedloom.strategies.scaffold import controls_of, model_part, with_controls
from fedloom.tasks.base import AnySiteData, SiteContext, Task
from fedloom.tasks.dp_sgd import require_no_dp_sgd

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


@dataclass(frozen=True)
class SiteEnv:
    """What stays the same for a site across its rounds: where its data and its state
    folder are, the device its code runs on, the plan's loop settings and local
    tensors. Built once per site (a collaborator) or per simulated site (a worker)."""

    total_rounds: int = 0
    device: str = "cpu"
    data_path: Path | None = None
    state_dir: Path | None = None
    loop: LoopSettings = LoopSettings()
    local: tuple[str, ...] = ()  # fnmatch patterns of tensors that never leave the site
    personal: PersonalSettings | None = None  # Ditto's personal model (training.personal)


LOCAL_TENSORS = "local.safetensors"  # in the site's state folder


def site_env(
    plan: Plan,
    *,
    device: str | None = None,
    data_path: Path | None = None,
    state_dir: Path | None = None,
) -> SiteEnv:
    """A site's :class:`SiteEnv` from the plan: ``device`` (the site's own choice,
    ``--device``) wins over the plan's ``training.device``."""
    from fedloom.runtime.devices import resolve_device

    t = plan.training
    loop = LoopSettings(
        optimizer=t.optimizer,
        schedule=t.schedule,
        grad_accumulation=t.grad_accumulation,
        grad_clip=t.grad_clip,
        precision=t.precision,
        deterministic=t.deterministic,
    )
    return SiteEnv(
        total_rounds=plan.rounds,
        device=resolve_device(device or t.device),
        data_path=data_path,
        state_dir=state_dir,
        loop=loop,
        local=tuple(t.local),
        personal=None if t.personal is None else PersonalSettings(**t.personal.model_dump()),
    )


def outside_rounds(plan: Plan, name: str, device: str) -> SiteContext:
    """The context of work outside a site's rounds (the test set, the centralised
    baseline, the smoke check before a site joins): no site index, round 0, a seed
    keyed by ``name``, the plan's loop settings on ``device``."""
    return SiteContext(
        name,
        -1,
        0,
        int_seed(plan.seed, 0, name, "train"),
        total_rounds=plan.rounds,
        device=device,
        loop=site_env(plan, device=device).loop,
    )


def local_names(weights: Weights, patterns: tuple[str, ...]) -> list[str]:
    """The names of the tensors of ``weights`` that the plan keeps at the site."""
    if not patterns:
        return []
    return [n for n in weights if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def with_local_tensors(weights: Weights, env: SiteEnv) -> Weights:
    """``weights`` with the site's own values of its local tensors, kept in its state
    folder since its last training round (the global values until then)."""
    names = local_names(weights, env.local)
    path = env.state_dir / LOCAL_TENSORS if env.state_dir is not None else None
    if not names or path is None or not path.is_file():
        return weights
    kept = load_weights(path)
    mine = {n: kept[n] for n in names if n in kept and kept[n].shape == weights[n].shape}
    if not mine:
        return weights
    return read_only({n: mine.get(n, a) for n, a in weights.items()})


def execute(
    task: Task,
    instruction: Instruction,
    weights: Weights,
    data: AnySiteData,
    *,
    site: str,
    index: int,
    plan_seed: int,
    dp_sgd: DPSGDSettings | None = None,
    rounds_selected: int = 1,
    env: SiteEnv = SiteEnv(),
) -> SiteAnswer:
    sent = read_only(weights)  # a task that writes into them fails the same in every mode
    received, controls = model_part(sent), controls_of(sent)  # SCAFFOLD's c, if any
    weights = with_local_tensors(received, env)
    metrics: dict[str, float] = {}
    training = instruction.kind is not InstructionKind.EVALUATE
    evaluating = not training or instruction.settings.evaluate
    if env.state_dir is not None:  # the task may write its own files there from round 1
        env.state_dir.mkdir(parents=True, exist_ok=True)
    variates = None
    if controls and training:
        variates = site_variates(
            controls,
            supported=getattr(task, "supports_scaffold", False),
            task_name=type(task).__name__,
            state_dir=env.state_dir,
            round=instruction.round,
            local=set(local_names(received, env.local)),
        )
    context = SiteContext(
        site,
        index,
        instruction.round,
        int_seed(plan_seed, instruction.round, site, "train"),
        data_path=env.data_path,
        options=dict(instruction.config),  # the strategy's options for this round
        dp_sgd=dp_sgd,
        rounds_selected=rounds_selected,
        total_rounds=env.total_rounds,
        device=env.device,
        state_dir=env.state_dir,
        loop=env.loop,
        correction=variates.correction() if variates is not None else {},
    )
    if evaluating:
        seen = _evaluated(task.evaluate(weights, data.val, context))
        metrics.update({f"global_{k}": float(v) for k, v in seen.metrics.items()})
        metrics["val_samples"] = float(seen.num_samples)
        if not training:
            mine = kept_personal(env.state_dir, weights) if env.personal else None
            if mine is not None:  # the final evaluation: the personal model's figures too
                metrics.update(personal_metrics(task, mine, data.val, context))
            return SiteAnswer(seen.num_samples, metrics, None)

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
        local = _evaluated(task.evaluate(out.weights, data.val, context))
        metrics.update({f"local_{k}": float(v) for k, v in local.metrics.items()})
    metrics.update({k: float(v) for k, v in out.metrics.items()})
    metrics.update(context.logged)
    if env.personal is not None:  # Ditto: the site's own model, pulled towards the global
        settings = instruction.settings
        mine = train_personal(task, weights, data, settings, context, env.personal, plan_seed)
        if evaluating:
            metrics.update(personal_metrics(task, mine, data.val, context))
    kept = local_names(out.weights, env.local)
    if kept and env.state_dir is not None:
        env.state_dir.mkdir(parents=True, exist_ok=True)
        save_weights(env.state_dir / LOCAL_TENSORS, {n: out.weights[n] for n in kept})
    # a local tensor's update is zero: its values never leave the site
    trained = {n: (received[n] if n in kept else a) for n, a in out.weights.items()}
    steps = None if out.local_steps is None else int(out.local_steps)
    delta = subtract(trained, received)
    if variates is not None:
        moved = variates.step(weights, out.weights, steps, instruction.settings.lr)
        delta = with_controls(
            delta, {n: moved.get(n, np.zeros(a.shape, np.float32)) for n, a in controls.items()}
        )
    return SiteAnswer(int(out.num_samples), metrics, delta, steps)


def _evaluated(out: object) -> EvalOutput:
    if not isinstance(out, EvalOutput):
        raise TaskError(
            f"evaluate must return EvalOutput(num_samples, metrics), got {type(out).__name__}"
        )
    return out
