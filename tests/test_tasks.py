"""Task adapters: torch and NumPy, dtypes kept, the FedProx term, loading errors."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from fedloom import (
    NumpyTask,
    SiteContext,
    SiteData,
    SoftmaxRegression,
    TrainSettings,
    WorkspaceError,
)
from fedloom.core.weights import subtract
from fedloom.tasks import TorchTask
from fedloom.tasks.loader import load_task
from fedloom.tasks.torch_steps import numpy_to_tensor, tensor_to_numpy


def _blobs(n: int = 200, seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (rng.normal(size=(n, 4)) + y[:, None] * 2.0).astype(np.float32)
    return SiteData(x[:160], y[:160], x[160:], y[160:])


def _context(seed: int = 1) -> SiteContext:
    return SiteContext("site-a", 0, 1, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensors_cross_to_numpy_and_back_bit_identically(dtype: torch.dtype) -> None:
    t = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7).to(dtype)
    a = tensor_to_numpy(t)
    if dtype == torch.bfloat16:
        assert a.dtype == np.dtype(ml_dtypes.bfloat16)
    back = numpy_to_tensor(a)
    assert back.dtype == dtype and torch.equal(back, t)
    a.setflags(write=False)
    assert torch.equal(numpy_to_tensor(a), t)  # read-only arrays are copied, not refused


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_torch_task_keeps_buffers_and_their_dtypes() -> None:
    task = TorchTask(_bn_model)
    weights = task.init_weights(0)
    assert weights["1.num_batches_tracked"].dtype == np.int64
    out = task.train(weights, _blobs(), TrainSettings(epochs=2, batch_size=32, lr=0.1), _context())
    assert list(out.weights) == list(weights)
    assert out.num_samples == 160
    delta = subtract(out.weights, weights)
    assert delta["1.num_batches_tracked"] == 10  # 2 epochs x 5 batches
    assert out.metrics["train_loss"] > 0
    assert task.evaluate(out.weights, _blobs().val, _context()).metrics["accuracy"] > 0.8


def test_torch_training_is_deterministic_for_a_context_seed() -> None:
    task = TorchTask(_bn_model)
    w = task.init_weights(0)
    s = TrainSettings(epochs=1, batch_size=16, lr=0.1, momentum=0.9)
    a = task.train(w, _blobs(), s, _context(5)).weights
    b = task.train(w, _blobs(), s, _context(5)).weights
    c = task.train(w, _blobs(), s, _context(6)).weights
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("make", [lambda: TorchTask(_bn_model), lambda: SoftmaxRegression(4, 2)])
def test_the_fedprox_term_keeps_local_weights_near_the_global_model(make: object) -> None:
    task = make()  # type: ignore[operator]
    w = task.init_weights(0)

    def drift(mu: float) -> float:
        s = TrainSettings(epochs=3, batch_size=16, lr=0.1, proximal_mu=mu)
        d = subtract(task.train(w, _blobs(), s, _context()).weights, w)
        params = {k: v for k, v in d.items() if "running" not in k and "batches" not in k}
        return float(sum(np.sum(v.astype(np.float64) ** 2) for v in params.values()))

    assert drift(5.0) < 0.5 * drift(0.0)


def test_numpy_task_wraps_three_functions() -> None:
    def init(seed: int) -> dict[str, np.ndarray]:
        return {"w": np.zeros(4, np.float32)}

    def train(weights, data, settings, rng):  # type: ignore[no-untyped-def]
        return {"w": weights["w"] + settings.lr * data.x_train.mean(axis=0)}

    def evaluate(weights, x, y):  # type: ignore[no-untyped-def]
        return {"accuracy": float(np.mean((x @ weights["w"] > 2) == y))}

    task = NumpyTask(init, train, evaluate)
    out = task.train(task.init_weights(0), _blobs(), TrainSettings(lr=1.0), _context())
    assert out.num_samples == 160 and out.weights["w"].shape == (4,)
    assert task.evaluate(out.weights, _blobs().val, _context()).num_samples == 40


def test_softmax_regression_learns() -> None:
    task = SoftmaxRegression(4, 2)
    out = task.train(task.init_weights(0), _blobs(), TrainSettings(epochs=5, lr=0.1), _context())
    assert task.evaluate(out.weights, _blobs().val, _context()).metrics["accuracy"] > 0.85


def test_loading_a_task_module_explains_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="not found"):
        load_task(tmp_path)
    (tmp_path / "task.py").write_text("x = 1\n")
    with pytest.raises(WorkspaceError, match="defines no `task`"):
        load_task(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "task.py").write_text("import fedloom_no_such_module\n")
    with pytest.raises(WorkspaceError, match="cannot import fedloom_no_such_module"):
        load_task(broken)
    crashing = tmp_path / "crashing"
    crashing.mkdir()
    (crashing / "task.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(WorkspaceError, match="boom at import"):
        load_task(crashing)


def test_a_syntax_error_in_the_task_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text("x = 1\ndef broken(:\n")
    with pytest.raises(WorkspaceError, match=r"task\.py, line 2: syntax error"):
        load_task(tmp_path)
