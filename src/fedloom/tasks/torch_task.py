"""The PyTorch adapter: the user writes the model, fedloom writes the training loop.

Importing this module imports torch (the ``torch`` extra). The model is built once
per process and reused: each round only its weights are replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import torch
from torch import nn

from fedloom.errors import TaskError
from fedloom.records import EvalOutput, TrainOutput, TrainSettings
from fedloom.tasks.base import SiteContext, SiteData
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


class TorchTask:
    """A :class:`~fedloom.tasks.Task` for any ``torch.nn.Module`` classifier.

    The default loop: SGD (with the plan's lr, momentum, weight decay) over shuffled
    minibatches, cross-entropy loss, plus the FedProx proximal term
    ``(mu / 2) * ||w - w_global||^2`` when the strategy sets ``proximal_mu``.
    """

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
        model = self.model()
        load_weights_into(model, weights)
        torch.default_generator.manual_seed(context.seed)  # CPU only: no CUDA stack capture
        rng = np.random.default_rng(context.seed)
        x = torch.from_numpy(np.ascontiguousarray(data.x_train, dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(data.y_train, dtype=np.int64))
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
        return TrainOutput(state_to_weights(model), n, metrics)

    def evaluate(self, weights: Weights, x: np.ndarray, y: np.ndarray) -> EvalOutput:
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
