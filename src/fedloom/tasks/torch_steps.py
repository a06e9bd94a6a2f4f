"""The parts of fedloom's built-in training loop that every torch task shares
(:class:`~fedloom.tasks.torch_task.TorchTask`'s loop and
:class:`~fedloom.tasks.hf_task.HFTask`'s): the plan's optimiser, bf16 autocast, one
epoch of minibatches with gradient accumulation, clipping and FedProx's term, and the
model on the site's device for one call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch import nn

from fedloom.core.errors import TaskError
from fedloom.core.records import TrainSettings
from fedloom.tasks.base import SiteContext
from fedloom.tasks.schedules import learning_rate


@dataclass
class Tally:
    """What a round of local training counted: the sum of its minibatch losses, the
    minibatches, and the optimiser steps."""

    loss: float = 0.0
    batches: int = 0
    steps: int = 0

    def metrics(self) -> dict[str, Any]:
        return {"train_loss": self.loss / self.batches} if self.batches else {}


def accumulated_epoch(
    batches: Iterable[Any],
    num_batches: int,
    loss_of: Callable[[Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    anchors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    context: SiteContext,
    tally: Tally,
    corrections: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
) -> None:
    """One epoch of the built-in loop over ``batches`` (``num_batches`` of them):
    ``loss_of(batch)`` under the plan's autocast, FedProx's ``(mu / 2) * ||p - a||^2``
    over the ``(parameter, anchor)`` pairs, ``training.grad_accumulation`` minibatches
    to a step (each giving 1/k of the step's gradient; the epoch's last group 1/its
    size), the gradient's norm clipped to ``training.grad_clip``, then SCAFFOLD's
    ``(parameter, c - c_i)`` ``corrections`` added to it. Counts into ``tally``."""
    accumulate, clip = context.loop.grad_accumulation, context.loop.grad_clip
    for i, batch in enumerate(batches):
        if i % accumulate == 0:
            optimizer.zero_grad(set_to_none=True)
        with autocast(context):
            loss = loss_of(batch)
        tally.loss += float(loss.detach())
        tally.batches += 1
        if anchors:
            prox = sum(((p - a) ** 2).sum() for p, a in anchors)
            loss = loss + 0.5 * settings.proximal_mu * prox
        group = min(accumulate, num_batches - (i // accumulate) * accumulate)
        if group > 1:
            loss = loss / group
        loss.backward()  # type: ignore[no-untyped-call]
        if (i + 1) % accumulate == 0 or i + 1 == num_batches:
            if clip > 0:
                nn.utils.clip_grad_norm_(params, clip)
            for p, correction in corrections:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(correction.to(p.device, p.grad.dtype))
            optimizer.step()
            tally.steps += 1


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``t`` in the same dtype (bfloat16 through ml_dtypes)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()


def numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor holding ``a`` (copied if ``a`` is read-only), dtype kept."""
    a = np.require(a, requirements=["C", "W"])
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def prox_pairs(
    named: Mapping[str, nn.Parameter],
    names: Iterable[str],
    settings: TrainSettings,
    context: SiteContext,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FedProx's ``(parameter, anchor)`` pairs for the trainable parameters ``names``
    (none without ``proximal_mu``): the anchor is the parameter's value now (the model
    the round started from) or, where the context gives one, ``SiteContext.anchor``'s
    (Ditto: the global model, while a personal model trains). Call it with the model on
    its device."""
    if settings.proximal_mu <= 0:
        return []
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name in names:
        p = named.get(name)
        if p is None or not p.requires_grad:
            continue
        given = context.anchor.get(name) if context.anchor is not None else None
        anchor = p.detach().clone() if given is None else numpy_to_tensor(given)
        pairs.append((p, anchor.to(p.device, p.dtype)))
    return pairs


def scaffold_pairs(
    named: Mapping[str, nn.Parameter], context: SiteContext
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, c - c_i)`` for each trainable parameter SCAFFOLD corrects (none
    without it; a buffer such as batch norm's statistics takes no gradient step)."""
    return [
        (p, torch.from_numpy(np.array(correction, np.float32)))
        for name, correction in context.correction.items()
        if (p := named.get(name)) is not None and p.requires_grad
    ]


def make_optimizer(
    params: list[nn.Parameter], settings: TrainSettings, context: SiteContext
) -> torch.optim.Optimizer:
    """The plan's optimiser (``training.optimizer``) over ``params``, at this round's
    learning rate: SGD (with ``momentum`` and ``weight_decay``), Adam (L2
    ``weight_decay``) or AdamW (decoupled ``weight_decay``); Adam's betas are torch's."""
    loop = context.loop
    lr = learning_rate(settings.lr, loop.schedule, context.round, context.total_rounds)
    if loop.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=settings.weight_decay)
    if loop.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    if loop.optimizer != "sgd":
        raise TaskError(f"unknown optimizer {loop.optimizer!r}; use sgd, adam or adamw")
    return torch.optim.SGD(
        params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def autocast(context: SiteContext) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the site's device when the plan asks for it
    (``training.precision: bf16``); nothing otherwise."""
    if context.loop.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=context.device.split(":")[0], dtype=torch.bfloat16)


@contextlib.contextmanager
def on_device(model: nn.Module, device: str) -> Iterator[None]:
    """``model`` on ``device`` for the block, back on the CPU afterwards: between calls
    a worker's GPU holds nothing of it."""
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")
