"""One round of sample-level DP-SGD for :class:`~fedloom.tasks.TorchTask`, through Opacus.

Only the training lives here; the accounting is :mod:`fedloom.tasks.dp_sgd`'s.
Importing this module imports torch, not Opacus: Opacus is imported when a round asks
for DP-SGD.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedloom.core.errors import TaskError
from fedloom.core.records import DPSGDSettings, TrainSettings
from fedloom.tasks import dp_sgd
from fedloom.tasks.base import SiteContext

OptimizerFn = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
LossOf = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def secret_generator(device: str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from the operating system's CSPRNG.

    The draws themselves come from torch's own generator, not a cryptographic one:
    Opacus's ``secure_mode`` (which needs ``torchcsprng``) is not used.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(64))


def dp_sgd_problems(context: SiteContext) -> list[str]:
    """The plan's loop settings that DP-SGD cannot honour."""
    problems = []
    if context.loop.grad_accumulation > 1:
        problems.append(
            "training.grad_accumulation > 1 with privacy.dp_sgd: DP-SGD's accountant counts "
            "one noisy step per sampled batch; set grad_accumulation to 1 (or raise batch_size)"
        )
    if context.loop.precision != "fp32":
        problems.append(
            "training.precision bf16 with privacy.dp_sgd: Opacus computes per-sample "
            "gradients in full precision; set precision to fp32"
        )
    return problems


def train_dp_sgd(
    model: nn.Module,
    loss_of: LossOf,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    dp: DPSGDSettings,
    context: SiteContext,
    make_optimizer: OptimizerFn,
) -> dict[str, Any]:
    """One round of sample-level DP-SGD through Opacus; returns the round's metrics.

    ``model``, ``x`` and ``y`` are on ``context.device``. The model is wrapped for this
    round only and unwrapped afterwards, so no hook outlives the call. Batches and
    noise come from generators seeded by the operating system, not from
    ``context.seed``: amplification by sampling and the Gaussian mechanism both assume
    the adversary cannot know them, and the plan's seed is known to whoever wrote the
    plan. The plan's optimiser and learning-rate schedule apply to the noisy gradient
    (post-processing, which costs no privacy); ``grad_clip`` does not: DP-SGD clips
    each sample's gradient to ``max_grad_norm``.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from opacus.validators import ModuleValidator

    if problems := dp_sgd_problems(context):
        raise TaskError("; ".join(problems))
    model.train()
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise TaskError(
            "the model cannot be trained with DP-SGD (privacy.dp_sgd): "
            + "; ".join(str(p) for p in problems),
            hint="replace BatchNorm by GroupNorm (opacus.validators.ModuleValidator.fix "
            "does it) or remove privacy.dp_sgd from the plan",
        )
    n = len(y)
    q = dp_sgd.sample_rate(n, settings.batch_size)
    steps = dp_sgd.steps_per_round(n, settings.batch_size, settings.epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    batches: list[list[int]] = []
    if steps:
        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=q, generator=secret_generator(), steps=steps
        )
        batches = list(sampler)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    try:
        optimizer = DPOptimizer(
            make_optimizer(params),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=max(1, round(q * n)),
            generator=secret_generator(context.device),
        )
        total, nonempty = 0.0, 0
        for indices in batches:
            optimizer.zero_grad(set_to_none=True)
            if indices:
                idx = torch.tensor(indices, dtype=torch.int64, device=x.device)
                loss = loss_of(wrapped(x[idx]), y[idx])
                total += float(loss.detach())
                nonempty += 1
                with warnings.catch_warnings():
                    # Opacus's hooks on the first layer, whose input needs no gradient
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()  # type: ignore[no-untyped-call]
            else:  # an empty batch still releases noise: the accountant counts the step
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
            if not optimizer.pre_step():  # clip, sum, noise, divide by the batch size
                continue
            # the proximal term holds no record: its gradient joins after the noise
            if anchors:
                for p, a in zip(params, anchors, strict=True):
                    if p.grad is not None:
                        p.grad.add_(p.detach() - a, alpha=settings.proximal_mu)
            optimizer.original_optimizer.step()  # momentum, weight decay: post-processing
    finally:
        wrapped.to_standard_module()  # hooks and per-sample attributes off the model
        for p in params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad  # DPOptimizer's attribute, which to_standard_module keeps
    eps = dp_sgd.site_epsilon(dp, settings, num_samples=n, rounds=max(1, context.rounds_selected))
    metrics: dict[str, Any] = {"train_loss": total / nonempty} if nonempty else {}
    metrics.update(dp_sgd_epsilon=eps, dp_sgd_delta=float(dp.delta))
    return metrics
