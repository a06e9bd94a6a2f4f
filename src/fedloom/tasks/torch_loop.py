"""Your own PyTorch loop, federated: fedloom hands in the global weights, takes back the
trained ones, and leaves everything else (model, Dataset, DataLoader, optimiser,
schedule, loss, metrics) to the user's code.

A script's functions plug in as they are::

    task = TorchLoop(build_model, train_one_round, evaluate, data=load_data)

- ``build_model()`` returns the ``nn.Module``; its ``state_dict()`` is what travels;
- ``data(ctx)`` builds the site's data from ``ctx.data_path`` (a file or folder of the
  site's own) and returns ``(train, val)``: datasets of any kind;
- ``train(model, train, ctx)`` trains ``model`` in place: it already holds the round's
  global weights and sits on ``ctx.device``; ``ctx.settings`` holds the round's
  training settings (the plan's epochs, lr, ..., FedProx's ``proximal_mu``); it may
  return metrics (a dict);
- ``evaluate(model, val, ctx)`` returns a dict of metrics; it runs in eval mode under
  ``torch.no_grad()``.

``train`` and ``evaluate`` may leave out ``ctx``: a function with two required positional
parameters, ``evaluate(model, dataset)``, is called with two arguments, so a script's
own functions plug in unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sized
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedloom.core.errors import TaskError, WorkspaceError
from fedloom.core.records import EvalOutput, TrainOutput, TrainSettings
from fedloom.core.weights import Weights
from fedloom.tasks.base import (
    CLASSIFICATION,
    AnySiteData,
    DataFunctions,
    Metrics,
    SiteContext,
    SiteData,
    Split,
)
from fedloom.tasks.kept_state import KEPT_FILE, save_kept
from fedloom.tasks.torch_steps import autocast
from fedloom.tasks.torch_task import built_model, load_weights_into, state_to_weights

ModelFn = Callable[[], nn.Module]
TrainFn = Callable[[nn.Module, Any, SiteContext], Mapping[str, float] | None]
EvaluateFn = Callable[[nn.Module, Any, SiteContext], Mapping[str, float]]
DataFn = Callable[[SiteContext], Any]


class TorchLoop(DataFunctions):
    """A :class:`~fedloom.tasks.Task` around the user's own training loop.

    ``metrics`` says which metric is primary (default: ``accuracy``, higher is better;
    ``Metrics(primary="dice")`` for a segmentation, ``Metrics(primary="r2",
    lower_is_better=("loss", "mae"))`` for a regression). A site's sample count (its
    aggregation weight) is ``len(train)``.
    """

    supports_dp_sgd: ClassVar[bool] = False

    def __init__(
        self,
        model: ModelFn,
        train: TrainFn,
        evaluate: EvaluateFn,
        *,
        data: DataFn | None = None,
        test_data: DataFn | None = None,
        metrics: Metrics = CLASSIFICATION,
    ) -> None:
        for name, fn in (("model", model), ("train", train), ("evaluate", evaluate)):
            if not callable(fn):
                raise WorkspaceError(f"TorchLoop's {name} must be a function, got {fn!r}")
        self.model_fn = model
        self.train_fn = with_context(train)
        self.evaluate_fn = with_context(evaluate)
        self.data_fn = data
        self.test_data_fn = test_data
        self.metrics = metrics
        self._model: nn.Module | None = None

    # -- the model, built once per process

    def model(self, device: str = "cpu") -> nn.Module:
        if self._model is None:
            self._model = built_model(self.model_fn)
        return self._model.to(device)

    def init_weights(self, seed: int) -> Weights:
        torch.manual_seed(seed)
        return state_to_weights(self.model_fn())

    # -- a round

    def train(
        self, weights: Weights, data: AnySiteData, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        context = dataclasses.replace(context, settings=settings)  # the same logged dict
        model = self._prepared(weights, context)
        train = as_dataset(data.train)
        n = len(train) if isinstance(train, Sized) else 0
        if n < 1:
            raise TaskError("the site's training data is empty (len(train) is 0)")
        model.train()
        with autocast(context):
            metrics = self.train_fn(model, train, context) or {}
        if not isinstance(metrics, Mapping):
            raise TaskError(
                f"the train function must return a dict of metrics or None, "
                f"got {type(metrics).__name__}"
            )
        for p in model.parameters():
            p.grad = None  # the gradients (a model's size) until next time
        if context.kept and context.state_dir is not None:
            save_kept(context.state_dir / KEPT_FILE, context.kept)
        return TrainOutput(state_to_weights(model), n, dict(metrics))

    def evaluate(self, weights: Weights, data: Any, context: SiteContext) -> EvalOutput:
        dataset = as_dataset(data)
        n = len(dataset) if isinstance(dataset, Sized) else 0
        if n == 0:
            return EvalOutput(0, {})
        model = self._prepared(weights, context)
        model.eval()
        with torch.no_grad(), autocast(context):
            metrics = self.evaluate_fn(model, dataset, context)
        if not isinstance(metrics, Mapping):
            raise TaskError(
                f"the evaluate function must return a dict of metrics, got {type(metrics).__name__}"
            )
        return EvalOutput(n, {k: float(v) for k, v in metrics.items()})

    def check_data(self, weights: Weights, data: AnySiteData, context: SiteContext) -> None:
        """The smoke check before a site joins: the user's ``evaluate`` on the first few
        training samples, with the initial model (a shape, channel or class mismatch
        fails here, before any round)."""
        train = as_dataset(data.train)
        if not isinstance(train, Sized) or len(train) == 0:
            raise TaskError("the site's training data is empty (len(train) is 0)")
        self.evaluate(weights, head(train, SMOKE_SAMPLES), context)

    def _prepared(self, weights: Weights, context: SiteContext) -> nn.Module:
        deterministic(context.loop.deterministic)
        torch.manual_seed(context.seed % 2**63)
        model = self.model(context.device)
        load_weights_into(model, weights)
        return model


SMOKE_SAMPLES = 4


def with_context(fn: Callable[..., Any]) -> Callable[[nn.Module, Any, SiteContext], Any]:
    """``fn`` as a function of ``(model, data, ctx)``: as it is when it takes a third
    positional argument without a default (or ``*args``); without the context when it
    takes two, as a script's ``evaluate(model, dataset)`` does."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: pass everything
        return fn
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return fn
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    if len(required) != 2:
        return fn

    @functools.wraps(fn)
    def without_context(model: nn.Module, data: Any, context: SiteContext) -> Any:
        return fn(model, data)

    return without_context


def head(dataset: Any, n: int) -> Any:
    """The first ``n`` samples of ``dataset`` (a list's slice, or torch's ``Subset``)."""
    if isinstance(dataset, list | tuple):
        return dataset[:n]
    from torch.utils.data import Subset

    return Subset(dataset, range(min(n, len(dataset))))


def as_dataset(data: Any) -> Any:
    """A split of arrays as a ``TensorDataset`` (features float32; class labels int64,
    other targets float32); any other dataset as it is."""
    if isinstance(data, Split):
        x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
        kind = np.int64 if np.issubdtype(data.y.dtype, np.integer) else np.float32
        y = torch.from_numpy(np.ascontiguousarray(data.y, dtype=kind))
        return TensorDataset(x, y)
    if isinstance(data, SiteData):
        return as_dataset(data.train)
    return data


def deterministic(on: bool) -> None:
    """Torch's deterministic algorithms on or off (``training.deterministic``). On a GPU
    this also sets the cuBLAS workspace that deterministic matrix products need."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != on:
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = False
