"""The PyTorch adapter: the user writes the model, fedloom writes the training loop.

Importing this module imports torch (the ``torch`` extra). The model is built once
per process and reused: each round only its weights are replaced. It waits on the CPU
between calls and goes to the site's device (``context.device``) for each one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedloom.core.errors import TaskError, WorkspaceError
from fedloom.core.records import EvalOutput, TrainOutput, TrainSettings
from fedloom.core.weights import Weights
from fedloom.tasks import metrics as ready
from fedloom.tasks.base import Metrics, SiteContext, SiteData, Split
from fedloom.tasks.numpy_task import arrays_of, require_arrays
from fedloom.tasks.torch_steps import (
    Tally,
    accumulated_epoch,
    autocast,
    make_optimizer,
    numpy_to_tensor,
    on_device,
    prox_pairs,
    scaffold_pairs,
    tensor_to_numpy,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


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


def class_index_loss(loss: object) -> bool:
    """Whether ``loss`` takes class indices as targets: cross-entropy or negative
    log-likelihood, as a function or a module."""
    functions = (nn.functional.cross_entropy, nn.functional.nll_loss)
    return loss in functions or isinstance(loss, nn.CrossEntropyLoss | nn.NLLLoss)


CROSS_ENTROPY_HINT = (
    "for a regression give TorchTask a regression loss and metrics, e.g. "
    "TorchTask(build_model, loss=nn.functional.mse_loss, metrics={'r2': r2, 'mae': mae}) "
    "(from fedloom.tasks.metrics); if the targets are class labels stored as floats, "
    "make them whole numbers and convert them: y.astype(np.int64)"
)


def targets_of(y: np.ndarray, class_indices: bool) -> torch.Tensor:
    """The targets ``y`` as the loss takes them, never silently changed.

    For a loss of class indices (cross-entropy): integer labels become int64, floats
    too when every one is a whole number; other floats are refused when there is one
    per sample (a regression's targets: :class:`TaskError` naming the fix), and kept as
    float32 when they have more axes (class probabilities). For any other loss the
    targets are float32, shape kept.
    """
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.bool_)):
        raise TaskError(f"the targets hold {y.dtype} values; TorchTask trains on numbers")
    if not class_indices or np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        kind = np.int64 if class_indices else np.float32
        return torch.from_numpy(np.ascontiguousarray(y, dtype=kind))
    whole = bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))
    if whole:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    if y.ndim >= 2:  # one probability per class
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    example = next(float(v) for v in y.ravel() if not (np.isfinite(v) and v == round(v)))
    raise TaskError(
        f"the targets are {y.dtype} numbers that are not class labels (e.g. {example:g}), "
        "but TorchTask's loss, cross-entropy, takes class indices 0, 1, 2 …",
        hint=CROSS_ENTROPY_HINT,
    )


def built_model(model_fn: Callable[[], nn.Module]) -> nn.Module:
    """``model_fn()``, refused with a :class:`TaskError` unless it is a module."""
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TaskError(
            f"the model function returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


class TorchTask:
    """A :class:`~fedloom.tasks.Task` for any ``torch.nn.Module``: fedloom's training loop.

    ``TorchTask(build_model)`` trains a classifier: cross-entropy loss, accuracy and loss
    reported, accuracy primary. Any other model declares its loss and its metrics::

        TorchTask(build_model, loss=nn.functional.mse_loss,
                  metrics={"r2": r2, "mae": mae})          # r2 primary (the first)

    - ``loss(outputs, targets)``: a torch loss (default cross-entropy);
    - ``metrics``: names to functions ``(outputs, targets) -> float`` evaluated on a
      whole split (ready ones in :mod:`fedloom.tasks.metrics`); ``loss`` is always
      reported besides them. Without metrics: accuracy for cross-entropy, else the
      loss alone;
    - ``primary``: the metric that judges a model (default: the first of ``metrics``;
      ``accuracy`` for the default; ``loss`` when there is no other);
    - ``lower_is_better``: metric names that improve downwards; ``loss`` always does,
      and so do :data:`fedloom.tasks.metrics.LOWER_IS_BETTER`'s (mae, mse, rmse).

    The declaration is :attr:`metrics` (a :class:`~fedloom.tasks.Metrics`); the
    functions are :attr:`metric_functions`.

    A round: the plan's optimiser (``training.optimizer``: SGD with momentum and weight
    decay, Adam or AdamW), fresh each round, at ``lr`` scaled by the schedule across
    rounds (``training.schedule``, :mod:`fedloom.tasks.schedules`), over shuffled
    minibatches, ``training.grad_accumulation`` of them to a step, the gradient's norm
    clipped to ``training.grad_clip``, bf16 autocast with ``training.precision: bf16``,
    plus the FedProx proximal term ``(mu / 2) * ||w - w_global||^2`` when the strategy
    sets ``proximal_mu``.

    When the site's context asks for sample-level DP-SGD (the plan's
    ``privacy.dp_sgd``), the round trains through Opacus instead: Poisson-sampled
    batches, per-record gradients clipped to ``max_grad_norm``, Gaussian noise on their
    sum, and ``dp_sgd_epsilon`` / ``dp_sgd_delta`` in the metrics (see
    :mod:`fedloom.tasks.torch_dp`).
    """

    # trains with sample-level DP-SGD when the context asks (see dp_sgd.require_no_dp_sgd)
    supports_dp_sgd: ClassVar[bool] = True
    supports_scaffold: ClassVar[bool] = True  # adds SiteContext.correction to each step
    supports_ditto: ClassVar[bool] = True  # anchors FedProx's term at SiteContext.anchor

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        *,
        loss: LossFn | None = None,
        metrics: Mapping[str, MetricFn] | None = None,
        primary: str | None = None,
        lower_is_better: Sequence[str] | None = None,
    ) -> None:
        if not callable(model_fn):
            raise WorkspaceError(f"TorchTask's model_fn must be a function, got {model_fn!r}")
        if loss is not None and not callable(loss):
            raise WorkspaceError(f"TorchTask's loss must be a function, got {loss!r}")
        self.model_fn = model_fn
        self.loss: LossFn = loss or nn.functional.cross_entropy
        self.class_indices = class_index_loss(self.loss)
        if metrics is None:
            metrics = {"accuracy": ready.accuracy} if self.class_indices else {}
        self.metric_functions: dict[str, MetricFn] = _checked_functions(metrics)
        self.metrics = _declaration(self.metric_functions, primary, lower_is_better)
        self._model: nn.Module | None = None

    def model(self) -> nn.Module:
        """The model, built once per process (on the CPU, where it waits between calls)."""
        if self._model is None:
            self._model = built_model(self.model_fn)
        return self._model

    def init_weights(self, seed: int) -> Weights:
        torch.manual_seed(seed)
        return state_to_weights(self.model_fn())

    # -- a round

    def train(
        self, weights: Weights, data: SiteData, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        require_arrays(data, "TorchTask")
        y = targets_of(data.y_train, self.class_indices)
        x = torch.from_numpy(np.ascontiguousarray(data.x_train, dtype=np.float32))
        model = self.model()
        load_weights_into(model, weights)
        _seed(context)
        with on_device(model, context.device):
            x, y = x.to(context.device), y.to(context.device)
            steps: int | None = None  # DP-SGD's Poisson batches: not counted
            if context.dp_sgd is not None:
                from fedloom.tasks.torch_dp import train_dp_sgd

                metrics = train_dp_sgd(
                    model,
                    self._loss,
                    x,
                    y,
                    settings,
                    context.dp_sgd,
                    context,
                    lambda params: make_optimizer(params, settings, context),
                )
            else:
                metrics, steps = self._train(model, x, y, settings, context)
        return TrainOutput(state_to_weights(model), len(y), metrics, steps)

    def _train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: TrainSettings,
        context: SiteContext,
    ) -> tuple[dict[str, Any], int]:
        """One round of the built-in loop: its metrics, and the optimiser steps taken."""
        rng = np.random.default_rng(context.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        named = dict(model.named_parameters())
        anchors = prox_pairs(named, named, settings, context)
        optimizer = make_optimizer(params, settings, context)
        corrections = scaffold_pairs(named, context)
        model.train()
        n = len(y)
        batch = max(1, settings.batch_size)
        num_batches = math.ceil(n / batch)
        tally = Tally()
        for _ in range(settings.epochs):
            order = torch.from_numpy(rng.permutation(n)).to(x.device)
            batches = (order[start : start + batch] for start in range(0, n, batch))
            accumulated_epoch(
                batches,
                num_batches,
                lambda idx: self._loss(model(x[idx]), y[idx]),
                optimizer,
                params,
                anchors,
                settings,
                context,
                tally,
                corrections,
            )
        optimizer.zero_grad(set_to_none=True)  # the gradients (a model's size) until next time
        return tally.metrics(), tally.steps

    def _loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss, with one target per output shaped as the outputs (a model's
        ``(n, 1)`` output against ``(n,)`` targets) for a loss of values."""
        if (
            not self.class_indices
            and outputs.shape != targets.shape
            and outputs.numel() == targets.numel()
        ):
            targets = targets.view(outputs.shape)
        return self.loss(outputs, targets)

    # -- evaluation

    def evaluate(self, weights: Weights, data: Split, context: SiteContext) -> EvalOutput:
        x, y = arrays_of(data, "TorchTask")
        if len(y) == 0:
            return EvalOutput(0, {})
        targets = targets_of(y, self.class_indices)
        model = self.model()
        load_weights_into(model, weights)
        _deterministic(context)
        model.eval()
        with on_device(model, context.device), torch.no_grad():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            with autocast(context):
                outputs = torch.cat(
                    [model(xt[i : i + 1024].to(context.device)) for i in range(0, len(y), 1024)]
                )
            outputs, targets = outputs.float(), targets.to(context.device)
            loss = float(self._loss(outputs, targets))
            functions = self.metric_functions.items()
            metrics = {name: float(fn(outputs, targets)) for name, fn in functions}
        metrics["loss"] = loss
        return EvalOutput(len(y), metrics)

    # -- the smoke check before a site joins

    def check_data(self, weights: Weights, data: SiteData, context: SiteContext) -> None:
        """Refuse, before any round, data the model cannot train on: targets that do not
        fit the loss (floats for cross-entropy, class labels past the model's outputs),
        and features the model cannot take, found by running it (with ``weights``) on
        one small batch of the training split. Raises :class:`TaskError` naming the
        mismatch and the fix."""
        require_arrays(data, "TorchTask")
        if data.num_train == 0:
            raise TaskError("the site's training split is empty: there is nothing to train on")
        if context.dp_sgd is not None:
            from fedloom.tasks.torch_dp import dp_sgd_problems

            if problems := dp_sgd_problems(context):
                raise TaskError("; ".join(problems))
        y = targets_of(data.y_train, self.class_indices)
        if data.num_val:
            targets_of(data.y_val, self.class_indices)
        rows = min(data.num_train, CHECK_ROWS)
        x = torch.from_numpy(np.ascontiguousarray(data.x_train[:rows], dtype=np.float32))
        model = self.model()
        load_weights_into(model, weights)
        model.eval()
        try:
            with on_device(model, context.device), torch.no_grad(), warnings.catch_warnings():
                # a loss that would broadcast outputs against targets of another shape
                warnings.filterwarnings("error", message="Using a target size")
                with autocast(context):
                    outputs = model(x.to(context.device)).float()
                self._check_classes(outputs, y)
                self._loss(outputs, y[:rows].to(context.device))
        except TaskError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's model and loss on this data
            raise TaskError(
                f"the model does not fit the site's data: running it on {rows} training "
                f"sample(s) (per sample: features of shape {tuple(x.shape[1:])}, targets of "
                f"shape {tuple(y.shape[1:])} {y.dtype}) failed with {type(err).__name__}: {err}",
                hint="make the model's input the features' shape and its output what the "
                "loss takes (class scores for cross-entropy, one value per target otherwise)",
            ) from err

    def _check_classes(self, outputs: torch.Tensor, y: torch.Tensor) -> None:
        """Class labels within the model's class scores (a loss of class indices)."""
        if not (self.class_indices and y.dtype == torch.int64 and outputs.ndim == y.ndim + 1):
            return
        classes, low, top = outputs.shape[1], int(y.min()), int(y.max())
        if top >= classes or low < 0:
            raise TaskError(
                f"the targets name classes {low}..{top}, but the model gives {classes} class "
                "score(s) per sample",
                hint=f"give the model's last layer {top + 1} outputs, or number the classes "
                f"0..{classes - 1}",
            )


CHECK_ROWS = 8  # training samples the smoke check runs the model on


def _deterministic(context: SiteContext) -> None:
    """Torch's deterministic mode as the plan says (``training.deterministic``)."""
    from fedloom.tasks.torch_loop import deterministic

    deterministic(context.loop.deterministic)


def _seed(context: SiteContext) -> None:
    """Seed torch for a round (dropout, random layers) and set its deterministic mode.
    On the CPU a run is reproducible either way; on a GPU only in deterministic mode."""
    _deterministic(context)
    torch.default_generator.manual_seed(context.seed)  # not torch.manual_seed: no CUDA init
    if context.device.startswith("cuda"):
        torch.cuda.manual_seed_all(context.seed % 2**63)


def _checked_functions(metrics: Mapping[str, MetricFn]) -> dict[str, MetricFn]:
    if not isinstance(metrics, Mapping):
        raise WorkspaceError(
            f"TorchTask's metrics must map names to functions, got {type(metrics).__name__}",
            hint="e.g. metrics={'r2': r2, 'mae': mae} (from fedloom.tasks.metrics)",
        )
    problems = []
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name:
            problems.append(f"metric name {name!r} is not a word")
        elif name == "loss":
            problems.append("'loss' is always reported: leave it out of metrics")
        if not callable(fn):
            problems.append(f"metric {name!r} is {fn!r}, not a function (outputs, targets)")
    if problems:
        raise WorkspaceError("TorchTask's metrics: " + "; ".join(problems))
    return dict(metrics)


def _declaration(
    functions: Mapping[str, MetricFn], primary: str | None, lower: Sequence[str] | None
) -> Metrics:
    """The :class:`Metrics` a TorchTask declares for its metric functions."""
    names = [*functions, "loss"]
    chosen = primary if primary is not None else names[0]
    if chosen not in names:
        raise WorkspaceError(
            f"TorchTask's primary metric {chosen!r} is not one it reports: {', '.join(names)}"
        )
    if isinstance(lower, str):
        lower = (lower,)
    if lower is None:
        lower = [n for n, fn in functions.items() if fn in ready.LOWER_IS_BETTER]
    return Metrics(primary=chosen, lower_is_better=tuple(dict.fromkeys(["loss", *lower])))
