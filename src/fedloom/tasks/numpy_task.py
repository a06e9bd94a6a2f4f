"""The NumPy path: a task written as three plain functions, no torch needed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedloom.core.errors import TaskError
from fedloom.core.records import EvalOutput, TrainOutput, TrainSettings
from fedloom.core.weights import Weights
from fedloom.tasks.base import SiteContext, SiteData, Split

InitFn = Callable[[int], Weights]
TrainFn = Callable[[Weights, SiteData, TrainSettings, np.random.Generator], Weights]
EvaluateFn = Callable[[Weights, np.ndarray, np.ndarray], Mapping[str, float]]


@dataclass(frozen=True)
class NumpyTask:
    """Adapts ``init(seed)``, ``train(weights, data, settings, rng)`` and
    ``evaluate(weights, x, y)`` to the :class:`~fedloom.tasks.Task` interface.

    ``train`` returns the locally trained weights; the sample count is the size of
    the site's training split.
    """

    init: InitFn
    train_fn: TrainFn
    evaluate_fn: EvaluateFn

    def init_weights(self, seed: int) -> Weights:
        return self.init(seed)

    def train(
        self, weights: Weights, data: SiteData, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        require_arrays(data, "NumpyTask")
        rng = np.random.default_rng(context.seed)
        local = self.train_fn(weights, data, settings, rng)
        return TrainOutput(local, data.num_train)

    def evaluate(self, weights: Weights, data: Split, context: SiteContext) -> EvalOutput:
        x, y = arrays_of(data, "NumpyTask")
        return EvalOutput(len(y), dict(self.evaluate_fn(weights, x, y)))


def arrays_of(data: object, who: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(x, y)`` arrays of a split; a task that trains on arrays only refuses a
    dataset of another kind, naming what it got."""
    if isinstance(data, Split):
        return data.x, data.y
    if isinstance(data, tuple) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    raise TaskError(
        f"{who} evaluates arrays (x, y), got {type(data).__name__}",
        hint="return SiteData from load_data, or use TorchLoop for data of your own kind",
    )


def require_arrays(data: object, who: str) -> None:
    if not isinstance(data, SiteData):
        raise TaskError(
            f"{who} trains on arrays (SiteData), got {type(data).__name__}",
            hint="return SiteData from load_data, or use TorchLoop for data of your own kind",
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass(frozen=True)
class SoftmaxRegression:
    """Multinomial logistic regression in NumPy, trained by minibatch SGD.

    The FedProx proximal term ``(mu / 2) * ||w - w_global||^2`` is part of the step (its
    anchor ``SiteContext.anchor`` where given: Ditto's personal model), and so is
    SCAFFOLD's correction ``c - c_i`` (``SiteContext.correction``).
    """

    supports_scaffold: ClassVar[bool] = True
    supports_ditto: ClassVar[bool] = True  # anchors the proximal term at SiteContext.anchor

    num_features: int
    num_classes: int

    def init_weights(self, seed: int) -> Weights:
        return {
            "weight": np.zeros((self.num_features, self.num_classes), dtype=np.float32),
            "bias": np.zeros((self.num_classes,), dtype=np.float32),
        }

    def train(
        self, weights: Weights, data: SiteData, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        require_arrays(data, "SoftmaxRegression")
        rng = np.random.default_rng(context.seed)
        anchor = context.anchor if context.anchor is not None else weights  # Ditto: global
        w0 = anchor["weight"].astype(np.float64)
        b0 = anchor["bias"].astype(np.float64)
        w = weights["weight"].astype(np.float64)
        b = weights["bias"].astype(np.float64)
        vw, vb = np.zeros_like(w), np.zeros_like(b)
        x = data.x_train.astype(np.float64)
        onehot = np.eye(self.num_classes)[data.y_train]
        n = len(x)
        batch = max(1, settings.batch_size)
        cw, cb = (
            np.asarray(context.correction.get(k, 0.0), np.float64) for k in ("weight", "bias")
        )
        losses = []
        for _ in range(settings.epochs):
            order = rng.permutation(n)
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                p = _softmax(x[idx] @ w + b)
                picked = p[np.arange(len(idx)), data.y_train[idx]]
                losses.append(float(-np.mean(np.log(picked + 1e-12))))
                err = (p - onehot[idx]) / len(idx)
                gw = x[idx].T @ err + settings.weight_decay * w + settings.proximal_mu * (w - w0)
                gb = err.sum(axis=0) + settings.proximal_mu * (b - b0)
                gw, gb = gw + cw, gb + cb  # SCAFFOLD (0 without it)
                vw = settings.momentum * vw + gw
                vb = settings.momentum * vb + gb
                w -= settings.lr * vw
                b -= settings.lr * vb
        local = {"weight": w.astype(np.float32), "bias": b.astype(np.float32)}
        metrics = {"train_loss": float(np.mean(losses))} if losses else {}
        return TrainOutput(local, n, metrics, len(losses))  # one step a minibatch

    def evaluate(self, weights: Weights, data: Split, context: SiteContext) -> EvalOutput:
        x, y = arrays_of(data, "SoftmaxRegression")
        if len(y) == 0:
            return EvalOutput(0, {})
        p = _softmax(x.astype(np.float64) @ weights["weight"].astype(np.float64) + weights["bias"])
        loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
        accuracy = float(np.mean(p.argmax(axis=1) == y))
        return EvalOutput(len(y), {"accuracy": accuracy, "loss": loss})
