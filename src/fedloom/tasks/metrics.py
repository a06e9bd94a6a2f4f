"""Ready metric functions for :class:`~fedloom.tasks.TorchTask` (``metrics={...}``).

Each one is ``metric(outputs, targets) -> float``: the model's outputs on a whole split
and the split's targets, as torch tensors (on any device) or NumPy arrays. They compute
in float64 NumPy, so the figure does not depend on the device. This module does not
import torch.

- classification: :func:`accuracy`;
- regression: :func:`mae`, :func:`mse`, :func:`rmse` (lower is better) and :func:`r2`;
- binary segmentation masks: :func:`dice` and :func:`iou`.

:data:`LOWER_IS_BETTER` holds the functions whose figure improves downwards:
``TorchTask`` declares them so without being told.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

MetricFn = Callable[[Any, Any], float]


def as_array(value: Any) -> np.ndarray:
    """``value`` (a torch tensor on any device, or anything NumPy takes) as a float64
    NumPy array."""
    if hasattr(value, "detach"):  # a torch tensor: bfloat16 has no NumPy twin
        value = value.detach().cpu()
        value = (value.double() if value.is_floating_point() else value).numpy()
    return np.asarray(value, dtype=np.float64)


def _predictions(outputs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true labels: the highest score along axis 1 when ``outputs`` has
    one axis more than ``targets`` (class scores, two or more); else one logit per
    element, positive meaning class 1, against 0/1 targets."""
    out, y = as_array(outputs), as_array(targets)
    if out.ndim == y.ndim + 1 and out.shape[1] > 1:
        return out.argmax(axis=1), y
    out = _fitted(out, y)
    return (out > 0).astype(np.float64), (y > 0.5).astype(np.float64)


def _fitted(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``out`` in the shape of ``y`` (a model's ``(n, 1)`` output for ``(n,)`` targets)."""
    if out.shape == y.shape:
        return out
    if out.size != y.size:
        raise ValueError(f"outputs of shape {out.shape} do not match targets of shape {y.shape}")
    return out.reshape(y.shape)


def accuracy(outputs: Any, targets: Any) -> float:
    """The fraction of samples whose predicted class is the target: ``argmax`` of the
    class scores ``(n, classes, ...)`` against labels ``(n, ...)``; or, for outputs
    shaped like the targets, a positive logit against a 0/1 label, element by element."""
    pred, y = _predictions(outputs, targets)
    return float(np.mean(pred == y)) if y.size else 0.0


def _regression(outputs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    y = as_array(targets)
    return _fitted(as_array(outputs), y), y


def mae(outputs: Any, targets: Any) -> float:
    """Mean absolute error, ``mean(|outputs - targets|)``."""
    out, y = _regression(outputs, targets)
    return float(np.mean(np.abs(out - y))) if y.size else 0.0


def mse(outputs: Any, targets: Any) -> float:
    """Mean squared error, ``mean((outputs - targets) ** 2)``."""
    out, y = _regression(outputs, targets)
    return float(np.mean((out - y) ** 2)) if y.size else 0.0


def rmse(outputs: Any, targets: Any) -> float:
    """Root mean squared error, ``sqrt(mse)``, in the targets' units."""
    return float(np.sqrt(mse(outputs, targets)))


def r2(outputs: Any, targets: Any) -> float:
    """The coefficient of determination, ``1 - SS_res / SS_tot``: 1 for a perfect
    model, 0 for one that always predicts the targets' mean, negative for worse.

    As scikit-learn's ``r2_score``: with several targets per sample (``(n, k)``) the
    mean of each column's R²; a column of constant targets scores 1 when predicted
    exactly, else 0.
    """
    out, y = _regression(outputs, targets)
    if y.size == 0:
        return 0.0
    out2, y2 = out.reshape(len(y), -1), y.reshape(len(y), -1)
    res = ((y2 - out2) ** 2).sum(axis=0)
    tot = ((y2 - y2.mean(axis=0)) ** 2).sum(axis=0)
    scores = np.where(tot > 0, 1.0 - res / np.where(tot > 0, tot, 1.0), (res == 0) * 1.0)
    return float(scores.mean())


def _masks(outputs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true binary masks, one row per sample."""
    pred, y = _predictions(outputs, targets)
    n = len(y) if y.ndim else 1
    return pred.reshape(n, -1) > 0.5, y.reshape(n, -1) > 0.5


def dice(outputs: Any, targets: Any) -> float:
    """The Dice coefficient of binary masks, ``2 |P & T| / (|P| + |T|)``, for each
    sample, averaged over the samples; a sample with both masks empty scores 1.

    ``outputs`` are one logit per element (positive: foreground), or two class scores
    along axis 1 (class 1: foreground); ``targets`` are 0/1 masks.
    """
    pred, y = _masks(outputs, targets)
    if pred.size == 0:
        return 0.0
    both = (pred & y).sum(axis=1)
    total = pred.sum(axis=1) + y.sum(axis=1)
    return float(np.mean(np.where(total > 0, 2.0 * both / np.maximum(total, 1), 1.0)))


def iou(outputs: Any, targets: Any) -> float:
    """Intersection over union (Jaccard) of binary masks, ``|P & T| / |P | T|``, per
    sample, averaged over the samples; a sample with both masks empty scores 1.
    Inputs as for :func:`dice`."""
    pred, y = _masks(outputs, targets)
    if pred.size == 0:
        return 0.0
    both = (pred & y).sum(axis=1)
    either = (pred | y).sum(axis=1)
    return float(np.mean(np.where(either > 0, both / np.maximum(either, 1), 1.0)))


LOWER_IS_BETTER: frozenset[MetricFn] = frozenset({mae, mse, rmse})
