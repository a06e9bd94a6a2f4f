"""Test helpers: a small label-skewed federation of SoftmaxRegression sites, and a
naive float64 re-implementation of its local training, for the reference versions of
the drift and personalisation algorithms (SCAFFOLD, Ditto) the tests hold fedloom to."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.core.rng import int_seed

TASK = '''
import numpy as np

from fedloom.tasks import SiteData, SoftmaxRegression

SIZES = (40, 25, 60)


def site_arrays(index):
    """Site ``index``'s data: mostly its own two classes of four (label skew)."""
    rng = np.random.default_rng(100 + index)
    n = SIZES[index]
    own = (2 * index + rng.integers(0, 2, n)) % 4
    y = np.where(rng.random(n) < 0.8, own, rng.integers(0, 4, n))
    x = rng.normal(0, 1, (n, 5)) + np.eye(4, 5)[y] * 2.0
    return x.astype(np.float32), y.astype(np.int64)


class Skewed(SoftmaxRegression):
    def load_data(self, ctx):
        x, y = site_arrays(ctx.index)
        return SiteData(x, y, x[:5], y[:5])


task = Skewed(num_features=5, num_classes=4)
'''

PLAN = """version: 1
name: naive-reference
task: task.py
seed: 3
rounds: 3
sites: 3
data:
  dataset: custom
training:
  epochs: 2
  batch_size: 8
  lr: 0.1
strategy:
  name: {strategy}
evaluation:
  each_round: false
  final: false
"""

SITES = ["site-01", "site-02", "site-03"]
SEED, ROUNDS, EPOCHS, BATCH, LR = 3, 3, 2, 8, 0.1


def workspace(root: Path, strategy: str = "fedavg") -> Path:
    """The federation's workspace in ``root/ws``."""
    ws = root / "ws"
    ws.mkdir()
    (ws / "task.py").write_text(TASK)
    (ws / "federation.yaml").write_text(PLAN.format(strategy=strategy))
    return ws


def site_arrays() -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """The task's own ``site_arrays``."""
    namespace: dict[str, Any] = {}
    exec(compile(TASK, "task.py", "exec"), namespace)  # noqa: S102 - the test's own task
    arrays: Callable[[int], tuple[np.ndarray, np.ndarray]] = namespace["site_arrays"]
    return arrays


def local_sgd(
    start: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    *,
    epochs: int = EPOCHS,
    drift: np.ndarray | None = None,
    anchor: np.ndarray | None = None,
    lam: float = 0.0,
) -> tuple[np.ndarray, int]:
    """SoftmaxRegression's minibatch SGD in float64 from ``start`` (the weight rows, then
    the bias row), its batches drawn from ``seed``; ``drift`` is added to each gradient
    (SCAFFOLD's ``c - c_i``) and ``lam * (w - anchor)`` too (Ditto's pull). The trained
    weights and the steps taken."""
    rng = np.random.default_rng(seed)
    ext = np.hstack([x.astype(np.float64), np.ones((len(y), 1))])
    w, steps = start.copy(), 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for begin in range(0, len(y), BATCH):
            idx = order[begin : begin + BATCH]
            logits = ext[idx] @ w
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            grad = ext[idx].T @ ((p - np.eye(4)[y[idx]]) / len(idx))
            if drift is not None:
                grad = grad + drift
            if anchor is not None:
                grad = grad + lam * (w - anchor)
            w -= LR * grad
            steps += 1
    return w, steps


def train_seed(round: int, site: str, purpose: str = "train") -> int:
    return int_seed(SEED, round, site, purpose)


def as_rows(weights: Any) -> np.ndarray:
    """fedloom's ``{"weight", "bias"}`` as the naive layout."""
    return np.vstack([weights["weight"], np.asarray(weights["bias"])[None, :]])
