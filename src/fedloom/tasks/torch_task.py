"""The PyTorch adapter: the user writes the model, fedloom writes the training loop.

Importing this module imports torch (the ``torch`` extra). The model is built once
per process and reused: each round only its weights are replaced.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import torch
from torch import nn

from fedloom.errors import TaskError
from fedloom.records import DPSGDSettings, EvalOutput, TrainOutput, TrainSettings
from fedloom.tasks import dp_sgd
from fedloom.tasks.base import SiteContext, SiteData, Split
from fedloom.tasks.numpy_task import arrays_of, require_arrays
from fedloom.weights import Weights

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def state_to_weights(module: nn.Module) -> Weights:
    return {k: tensor_to_numpy(v) for k, v in module.state_dict().items()}


def load_weights_into(module: nn.Module, weights: Weights) -> None:
    state = module.state_dict()
    if list(state) != list(weights):
        raise TaskError(
            f"weights do not fit the model: model has {list(state)[:5]}…, got {list(weights)[:5]}…"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(numpy_to_tensor(weights[name]))


def _secret_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's CSPRNG.

    The draws themselves come from torch's Mersenne Twister, not a cryptographic
    generator: Opacus's ``secure_mode`` (which needs ``torchcsprng``) is not used.
    """
    return torch.Generator().manual_seed(secrets.randbits(64))


class TorchTask:
    """A :class:`~fedloom.tasks.Task` for any ``torch.nn.Module`` classifier.

    The default loop: SGD (with the plan's lr, momentum, weight decay) over shuffled
    minibatches, cross-entropy loss, plus the FedProx proximal term
    ``(mu / 2) * ||w - w_global||^2`` when the strategy sets ``proximal_mu``.

    When the site's context asks for sample-level DP-SGD (the plan's
    ``privacy.dp_sgd``), the round trains through Opacus instead: Poisson-sampled
    batches, per-record gradients clipped to ``max_grad_norm``, Gaussian noise on their
    sum, and ``dp_sgd_epsilon`` / ``dp_sgd_delta`` in the metrics (see
    :mod:`fedloom.tasks.dp_sgd`).
    """

    # trains with sample-level DP-SGD when the context asks (see dp_sgd.require_no_dp_sgd)
    supports_dp_sgd: ClassVar[bool] = True

    def __init__(self, model_fn: Callable[[], nn.Module], *, loss: LossFn | None = None) -> None:
        self.model_fn = model_fn
        self.loss = loss or nn.functional.cross_entropy
        self._model: nn.Module | None = None

    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self.model_fn()
        return self._model

    def init_weights(self, seed: int) -> Weights:
        torch.manual_seed(seed)
        return state_to_weights(self.model_fn())

    def train(
        self, weights: Weights, data: SiteData, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        require_arrays(data, "TorchTask")
        model = self.model()
        load_weights_into(model, weights)
        torch.default_generator.manual_seed(context.seed)  # CPU only: no CUDA stack capture
        x = torch.from_numpy(np.ascontiguousarray(data.x_train, dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(data.y_train, dtype=np.int64))
        if context.dp_sgd is not None:
            return self._train_dp_sgd(model, x, y, settings, context.dp_sgd, context)
        rng = np.random.default_rng(context.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
        optimizer = torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        model.train()
        n = len(y)
        batch = max(1, settings.batch_size)
        total, steps = 0.0, 0
        for _ in range(settings.epochs):
            order = torch.from_numpy(rng.permutation(n))
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(model(x[idx]), y[idx])
                total += float(loss.detach())
                steps += 1
                if anchors:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    loss = loss + 0.5 * settings.proximal_mu * prox
                loss.backward()
                optimizer.step()
        metrics: dict[str, Any] = {"train_loss": total / steps} if steps else {}
        optimizer.zero_grad(set_to_none=True)  # the gradients (a model's size) until next time
        return TrainOutput(state_to_weights(model), n, metrics)

    def _train_dp_sgd(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: TrainSettings,
        dp: DPSGDSettings,
        context: SiteContext,
    ) -> TrainOutput:
        """One round of sample-level DP-SGD through Opacus.

        The reused model is wrapped for this round only and unwrapped afterwards, so no
        hook outlives the call. Batches and noise come from generators seeded by the
        operating system, not from ``context.seed``: amplification by sampling and the
        Gaussian mechanism both assume the adversary cannot know them, and the plan's
        seed is known to whoever wrote the plan.
        """
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler
        from opacus.validators import ModuleValidator

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
                num_samples=n, sample_rate=q, generator=_secret_generator(), steps=steps
            )
            batches = list(sampler)
        wrapped = GradSampleModule(model, loss_reduction="mean")
        try:
            optimizer = DPOptimizer(
                torch.optim.SGD(
                    params,
                    lr=settings.lr,
                    momentum=settings.momentum,
                    weight_decay=settings.weight_decay,
                ),
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                expected_batch_size=max(1, round(q * n)),
                generator=_secret_generator(),
            )
            total, nonempty = 0.0, 0
            for indices in batches:
                optimizer.zero_grad(set_to_none=True)
                if indices:
                    idx = torch.tensor(indices, dtype=torch.int64)
                    loss = self.loss(wrapped(x[idx]), y[idx])
                    total += float(loss.detach())
                    nonempty += 1
                    with warnings.catch_warnings():
                        # Opacus's hooks on the first layer, whose input needs no gradient
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                else:  # an empty batch still releases noise: the accountant counts the step
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
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
        eps = dp_sgd.site_epsilon(
            dp, settings, num_samples=n, rounds=max(1, context.rounds_selected)
        )
        metrics: dict[str, Any] = {"train_loss": total / nonempty} if nonempty else {}
        metrics.update(dp_sgd_epsilon=eps, dp_sgd_delta=float(dp.delta))
        return TrainOutput(state_to_weights(model), n, metrics)

    def evaluate(self, weights: Weights, data: Split, context: SiteContext) -> EvalOutput:
        x, y = arrays_of(data, "TorchTask")
        if len(y) == 0:
            return EvalOutput(0, {})
        model = self.model()
        load_weights_into(model, weights)
        model.eval()
        with torch.no_grad():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
            logits = torch.cat([model(xt[i : i + 1024]) for i in range(0, len(yt), 1024)])
            loss = float(self.loss(logits, yt))
            accuracy = float((logits.argmax(dim=1) == yt).float().mean())
        return EvalOutput(len(y), {"accuracy": accuracy, "loss": loss})
