"""TorchTask, fedloom's built-in loop: the plan's optimiser, schedule, gradient
accumulation and clipping, bf16 autocast, any loss with its own metrics, and targets
that must fit the loss."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedloom import SiteContext, SiteData, TaskError, TrainSettings
from fedloom.core.errors import WorkspaceError
from fedloom.core.records import DPSGDSettings, LoopSettings
from fedloom.core.weights import Weights
from fedloom.tasks import Metrics, TorchTask
from fedloom.tasks.base import metrics_of
from fedloom.tasks.metrics import mae, r2
from fedloom.tasks.schedules import factor

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 6)).astype(np.float32)
LABELS = RNG.integers(0, 3, 64)
TARGETS = (X @ RNG.normal(size=6) + 0.1 * RNG.normal(size=64)).astype(np.float32)
CLASSES = SiteData(X[:48], LABELS[:48], X[48:], LABELS[48:])
VALUES = SiteData(X[:48], TARGETS[:48], X[48:], TARGETS[48:])
PLAIN = TrainSettings(epochs=1, batch_size=8, lr=0.05)


def _mlp(outputs: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, outputs))


def _context(round: int = 1, total: int = 0, **loop: object) -> SiteContext:
    return SiteContext("a", 0, round, 11, total_rounds=total, loop=LoopSettings(**loop))  # type: ignore[arg-type]


def _train(task: TorchTask, data: SiteData, context: SiteContext, **settings: object) -> Weights:
    start = task.init_weights(0)
    return task.train(start, data, dataclasses.replace(PLAIN, **settings), context).weights


def _same(a: Weights, b: Weights) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def _close(a: Weights, b: Weights) -> bool:
    return all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_schedule_scales_the_rounds_learning_rate() -> None:
    task = TorchTask(_mlp)
    f = factor("cosine", 4, 5)
    scheduled = _train(task, CLASSES, _context(4, 5, schedule="cosine"))
    by_hand = _train(task, CLASSES, _context(4, 5), lr=PLAIN.lr * f)
    assert _same(scheduled, by_hand)
    assert not _same(scheduled, _train(task, CLASSES, _context(4, 5)))


def test_adam_and_adamw_are_the_plans_choice() -> None:
    task = TorchTask(_mlp)
    start = task.init_weights(0)
    settings = TrainSettings(epochs=1, batch_size=48, lr=0.01)  # one step
    out = task.train(start, CLASSES, settings, _context(optimizer="adam")).weights
    for name in start:  # Adam's first step moves every weight by about lr
        moved = np.abs(out[name] - start[name])
        assert np.allclose(moved[moved > 0], 0.01, rtol=1e-2)
    sgd = task.train(start, CLASSES, settings, _context()).weights
    adamw = task.train(
        start, CLASSES, dataclasses.replace(settings, weight_decay=0.5), _context(optimizer="adamw")
    ).weights
    assert not _same(out, sgd) and not _same(out, adamw)


def test_k_accumulated_minibatches_make_one_step_of_a_k_times_larger_batch() -> None:
    task = TorchTask(_mlp)
    accumulated = _train(task, CLASSES, _context(grad_accumulation=3), batch_size=4, epochs=2)
    large = _train(task, CLASSES, _context(), batch_size=12, epochs=2)
    assert _close(accumulated, large)
    assert not _close(accumulated, _train(task, CLASSES, _context(), batch_size=4, epochs=2))


def test_clipping_bounds_each_step() -> None:
    task = TorchTask(_mlp)
    start = task.init_weights(0)
    one_step = TrainSettings(epochs=1, batch_size=48, lr=1.0)
    out = task.train(start, CLASSES, one_step, _context(grad_clip=1e-3)).weights
    norm = math.sqrt(sum(float(np.sum((out[k] - start[k]) ** 2)) for k in start))
    assert 0 < norm <= 1e-3 * (1 + 1e-5)


def test_bf16_autocast_trains_the_fp32_model_on_the_cpu() -> None:
    task = TorchTask(_mlp)
    out = _train(task, CLASSES, _context(precision="bf16"))
    assert all(a.dtype == np.float32 and np.all(np.isfinite(a)) for a in out.values())
    assert not _same(out, _train(task, CLASSES, _context()))
    metrics = task.evaluate(out, CLASSES.val, _context(precision="bf16")).metrics
    assert set(metrics) == {"accuracy", "loss"}


def test_a_classifier_reports_accuracy_and_loss_as_before() -> None:
    task = TorchTask(_mlp)
    assert metrics_of(task) == Metrics()
    out = task.evaluate(task.init_weights(0), CLASSES.val, _context()).metrics
    assert list(out) == ["accuracy", "loss"]


def test_a_regression_declares_its_metrics_and_gets_float_targets() -> None:
    task = TorchTask(lambda: _mlp(1), loss=nn.functional.mse_loss, metrics={"r2": r2, "mae": mae})
    assert metrics_of(task) == Metrics(primary="r2", lower_is_better=("loss", "mae"))
    start = task.init_weights(0)
    settings = TrainSettings(epochs=30, batch_size=8, lr=0.01)
    trained = task.train(start, VALUES, settings, _context(optimizer="adam")).weights
    before = task.evaluate(start, VALUES.val, _context()).metrics
    after = task.evaluate(trained, VALUES.val, _context()).metrics
    assert list(after) == ["r2", "mae", "loss"]
    assert after["r2"] > 0.8 > before["r2"] and after["mae"] < before["mae"]
    only_loss = TorchTask(lambda: _mlp(1), loss=nn.functional.mse_loss)
    assert metrics_of(only_loss) == Metrics(primary="loss")
    assert list(only_loss.evaluate(start, VALUES.val, _context()).metrics) == ["loss"]


def test_bad_metric_declarations_are_refused_when_the_task_is_made() -> None:
    with pytest.raises(WorkspaceError, match="primary metric 'dice'"):
        TorchTask(_mlp, primary="dice")
    with pytest.raises(WorkspaceError, match="'loss' is always reported"):
        TorchTask(_mlp, metrics={"loss": mae})
    with pytest.raises(WorkspaceError, match="not a function"):
        TorchTask(_mlp, metrics={"r2": 0.5})  # type: ignore[dict-item]
    custom = TorchTask(_mlp, metrics={"r2": r2, "mae": mae}, primary="mae", lower_is_better=["mae"])
    assert custom.metrics == Metrics(primary="mae", lower_is_better=("loss", "mae"))


def test_cross_entropy_refuses_float_targets_naming_the_fix() -> None:
    task = TorchTask(_mlp)
    with pytest.raises(TaskError, match="not class labels") as err:
        task.train(task.init_weights(0), VALUES, PLAIN, _context())
    assert err.value.hint is not None and "mse_loss" in err.value.hint
    assert "y.astype(np.int64)" in err.value.hint
    with pytest.raises(TaskError, match="not class labels"):
        task.check_data(task.init_weights(0), VALUES, _context())
    with pytest.raises(TaskError, match="not class labels"):
        task.evaluate(task.init_weights(0), VALUES.val, _context())
    whole = SiteData(X[:48], LABELS[:48].astype(np.float64), X[48:], LABELS[48:].astype(np.float64))
    assert _same(_train(task, whole, _context()), _train(task, CLASSES, _context()))


def test_the_smoke_check_names_a_model_that_does_not_fit_the_data() -> None:
    narrow = TorchTask(lambda: nn.Linear(5, 3))
    with pytest.raises(TaskError, match=r"features of shape \(6,\)"):
        narrow.check_data(narrow.init_weights(0), CLASSES, _context())
    two = TorchTask(lambda: _mlp(2))
    with pytest.raises(TaskError, match=r"classes 0..2, but the model gives 2") as err:
        two.check_data(two.init_weights(0), CLASSES, _context())
    assert err.value.hint is not None and "3 outputs" in err.value.hint
    wide = TorchTask(lambda: _mlp(3), loss=nn.functional.mse_loss)
    with pytest.raises(TaskError, match="does not fit"):
        wide.check_data(wide.init_weights(0), VALUES, _context())
    fits = TorchTask(lambda: _mlp(1), loss=nn.functional.mse_loss)
    fits.check_data(fits.init_weights(0), VALUES, _context())
    TorchTask(_mlp).check_data(TorchTask(_mlp).init_weights(0), CLASSES, _context())


def test_dp_sgd_refuses_settings_it_cannot_honour() -> None:
    task = TorchTask(_mlp)
    dp = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    context = dataclasses.replace(_context(grad_accumulation=2), dp_sgd=dp)
    with pytest.raises(TaskError, match="grad_accumulation"):
        task.train(task.init_weights(0), CLASSES, PLAIN, context)
    with pytest.raises(TaskError, match="grad_accumulation"):
        task.check_data(task.init_weights(0), CLASSES, context)


def test_training_leaves_the_model_on_the_cpu_and_returns_numpy() -> None:
    task = TorchTask(_mlp)
    out = _train(task, CLASSES, dataclasses.replace(_context(), device="cpu"))
    assert all(isinstance(a, np.ndarray) for a in out.values())
    assert all(p.device == torch.device("cpu") for p in task.model().parameters())
