"""Ditto at a site (Li et al., 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization"): besides training the global model, each site trains a personal
model ``v`` of its own, kept in its state folder and never sent, on the loss

    F_site(v) + (lam / 2) * ||v - w||^2

where ``w`` is the global model the site received this round. The task trains it as
it trains the global model, with FedProx's term anchored at ``w``
(``SiteContext.anchor``) instead of at the starting point. The site reports the
personal model's validation metrics as ``personal_<metric>``, at each training round
that evaluates and at the federation's final evaluation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedloom.core.errors import TaskError
from fedloom.core.records import EvalOutput, PersonalSettings, TrainOutput, TrainSettings
from fedloom.core.rng import int_seed
from fedloom.core.weights import Weights, check_compatible, read_only, specs_of
from fedloom.store.checkpoint import load_weights, save_weights
from fedloom.tasks.base import AnySiteData, SiteContext, Task

PERSONAL_FILE = "personal.safetensors"  # in the site's state folder


def kept_personal(state_dir: Path | None, model: Weights) -> Weights | None:
    """The site's personal model, if it has one laid out as ``model``."""
    if state_dir is None or not (state_dir / PERSONAL_FILE).is_file():
        return None
    kept = load_weights(state_dir / PERSONAL_FILE)
    try:
        check_compatible(kept, specs_of(model))
    except Exception:  # the model changed since (another plan): start again from it
        return None
    return read_only(kept)


def train_personal(
    task: Task,
    model: Weights,
    data: AnySiteData,
    settings: TrainSettings,
    context: SiteContext,
    personal: PersonalSettings,
    plan_seed: int,
) -> Weights:
    """Train the site's personal model for one round, from where it was (the received
    ``model`` the first time) towards ``model``, keep it, and return it."""
    if not getattr(task, "supports_ditto", False):
        raise TaskError(
            f"the plan asks for a personal model at each site (training.personal, "
            f"Ditto), which trains with a pull towards the global model, and "
            f"{type(task).__name__} does not train so",
            hint="use TorchTask, HFTask or SoftmaxRegression, or give your task "
            "supports_ditto = True and anchor its proximal term at SiteContext.anchor",
        )
    if context.state_dir is None:
        raise TaskError("a personal model is kept in the site's state folder; it has none")
    start = kept_personal(context.state_dir, model) or model
    out = task.train(
        start,
        data,
        dataclasses.replace(settings, epochs=personal.epochs, proximal_mu=personal.lam),
        dataclasses.replace(
            context,
            seed=int_seed(plan_seed, context.round, context.site, "personal"),
            anchor=model,
            correction={},
            logged={},
            kept={},
        ),
    )
    if not isinstance(out, TrainOutput):
        raise TaskError(f"train must return TrainOutput, got {type(out).__name__}")
    try:
        check_compatible(out.weights, specs_of(model))
    except Exception as err:
        raise TaskError(f"the personal model's training changed its layout: {err}") from err
    save_weights(context.state_dir / PERSONAL_FILE, dict(out.weights))
    return out.weights


def personal_metrics(
    task: Task, weights: Weights, val: object, context: SiteContext
) -> dict[str, float]:
    """The personal model's validation metrics, named ``personal_<metric>``."""
    out = task.evaluate(weights, val, context)
    if not isinstance(out, EvalOutput):
        raise TaskError(f"evaluate must return EvalOutput, got {type(out).__name__}")
    return {f"personal_{k}": float(v) for k, v in out.metrics.items()}
