"""The ready metric functions (fedloom.tasks.metrics) against scikit-learn's, on arrays
and on torch tensors alike; the learning-rate schedules across rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from fedloom.tasks import metrics
from fedloom.tasks.schedules import SCHEDULES, factor, learning_rate

RNG = np.random.default_rng(0)


def test_accuracy_takes_class_scores_or_one_logit_per_sample() -> None:
    scores = RNG.normal(size=(50, 4))
    labels = RNG.integers(0, 4, 50)
    want = sk.accuracy_score(labels, scores.argmax(axis=1))
    assert metrics.accuracy(scores, labels) == pytest.approx(want, abs=0)
    assert metrics.accuracy(torch.tensor(scores), torch.tensor(labels)) == want
    logits = RNG.normal(size=(50, 1))
    binary = RNG.integers(0, 2, 50)
    assert metrics.accuracy(logits, binary) == sk.accuracy_score(binary, logits[:, 0] > 0)


def test_regression_metrics_match_scikit_learn() -> None:
    y = RNG.normal(size=40)
    out = y + RNG.normal(scale=0.5, size=40)
    column = out.reshape(-1, 1)  # a model's (n, 1) output
    assert metrics.mae(column, y) == pytest.approx(sk.mean_absolute_error(y, out))
    assert metrics.mse(column, y) == pytest.approx(sk.mean_squared_error(y, out))
    assert metrics.rmse(out, y) == pytest.approx(math.sqrt(sk.mean_squared_error(y, out)))
    assert metrics.r2(column, y) == pytest.approx(sk.r2_score(y, out))
    tensors = torch.tensor(column, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    assert metrics.r2(*tensors) == pytest.approx(sk.r2_score(y, out), abs=1e-5)
    assert metrics.r2(y, y) == 1.0 and metrics.r2(np.full(40, y.mean()), y) == pytest.approx(0)


def test_r2_of_several_targets_averages_the_columns_as_scikit_learn_does() -> None:
    y = RNG.normal(size=(30, 3))
    out = y + RNG.normal(scale=0.7, size=(30, 3))
    assert metrics.r2(out, y) == pytest.approx(sk.r2_score(y, out))
    constant = np.ones((30, 1))
    assert metrics.r2(constant, constant) == 1.0  # scikit-learn's force_finite
    assert metrics.r2(constant * 2, constant) == 0.0


def test_dice_and_iou_of_binary_masks_match_scikit_learn_per_sample() -> None:
    logits = RNG.normal(size=(6, 8, 8))
    masks = RNG.random((6, 8, 8)) > 0.6
    pred = logits > 0
    pairs = [(m.ravel(), p.ravel()) for m, p in zip(masks, pred, strict=True)]
    dice = np.mean([sk.f1_score(m, p) for m, p in pairs])
    iou = np.mean([sk.jaccard_score(m, p) for m, p in pairs])
    assert metrics.dice(logits, masks) == pytest.approx(dice)
    assert metrics.iou(logits, masks) == pytest.approx(iou)
    two_class = np.stack([-logits, logits], axis=1)  # class scores along axis 1
    assert metrics.dice(torch.tensor(two_class), torch.tensor(masks.astype(np.int64))) == (
        pytest.approx(dice)
    )
    empty = np.zeros((2, 4, 4))
    assert metrics.dice(empty - 1, empty) == 1.0 and metrics.iou(empty - 1, empty) == 1.0


def test_outputs_of_another_size_are_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        metrics.mae(np.zeros((4, 3)), np.zeros(4))


def test_the_errors_are_declared_lower_is_better() -> None:
    assert {metrics.mae, metrics.mse, metrics.rmse} == set(metrics.LOWER_IS_BETTER)


def test_schedules_start_at_the_plans_lr_and_fall_without_reaching_zero() -> None:
    for schedule in SCHEDULES:
        factors = [factor(schedule, r, 10) for r in range(1, 11)]
        assert factors[0] == 1.0 and all(f > 0 for f in factors)
        assert factors == sorted(factors, reverse=True)
    assert factor("linear", 10, 10) == pytest.approx(0.1)
    assert factor("cosine", 6, 10) == pytest.approx(0.5)
    assert factor("constant", 7, 10) == 1.0
    assert factor("cosine", 0, 10) == 1.0 and factor("linear", 3, 0) == 1.0  # outside rounds
    assert learning_rate(0.2, "linear", 2, 4) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="unknown schedule"):
        factor("step", 1, 2)
