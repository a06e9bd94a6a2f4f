"""Sample-level DP-SGD in TorchTask: the accounting, clipping and noise, the model kept clean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from sklearn.datasets import load_breast_cancer
from torch import nn

from fedloom import SiteContext, SiteData, TaskError, TrainSettings
from fedloom.core.records import Accountant, DPSGDSettings
from fedloom.core.weights import Weights, subtract
from fedloom.tasks import TorchTask
from fedloom.tasks.dp_sgd import require_no_dp_sgd, sample_rate, site_epsilon, steps_per_round

SETTINGS = TrainSettings(epochs=1, batch_size=32, lr=0.05)
DP = DPSGDSettings(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)


def _cancer() -> SiteData:
    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    return SiteData(x[:400], y[:400].astype(np.int64), x[400:], y[400:].astype(np.int64))


DATA = _cancer()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def _context(dp: DPSGDSettings | None = DP, rounds: int = 1, seed: int = 7) -> SiteContext:
    return SiteContext("site-a", 0, rounds, seed, dp_sgd=dp, rounds_selected=rounds)


def _norm(w: Weights, start: Weights) -> float:
    return math.sqrt(
        sum(float(np.sum(d.astype(np.float64) ** 2)) for d in subtract(w, start).values())
    )


def _update_norm(dp: DPSGDSettings | None, settings: TrainSettings = SETTINGS) -> float:
    task = TorchTask(_mlp)
    w = task.init_weights(0)
    return _norm(task.train(w, DATA, settings, _context(dp)).weights, w)


def test_steps_and_sample_rate_follow_the_settings() -> None:
    assert steps_per_round(100, 32, 2) == 8  # 2 epochs x ceil(100 / 32)
    assert sample_rate(100, 32) == pytest.approx(0.32)
    assert sample_rate(10, 32) == 1.0  # a batch larger than the data takes every record
    assert steps_per_round(0, 32, 2) == 0
    assert site_epsilon(DP, SETTINGS, num_samples=400, rounds=0) == 0.0


def test_the_reported_epsilon_equals_an_rdp_accountant_over_the_same_history() -> None:
    task = TorchTask(_mlp)
    settings = TrainSettings(epochs=2, batch_size=32, lr=0.05)
    out = task.train(task.init_weights(0), DATA, settings, _context(rounds=3))
    q = 32 / 400
    steps = 2 * math.ceil(400 / 32)
    accountant = RDPAccountant()
    accountant.history = [(DP.noise_multiplier, q, steps)] * 3  # one entry per round
    assert out.metrics["dp_sgd_epsilon"] == pytest.approx(accountant.get_epsilon(DP.delta))
    assert out.metrics["dp_sgd_delta"] == DP.delta
    assert isinstance(out.metrics["dp_sgd_epsilon"], float) and out.metrics["dp_sgd_epsilon"] > 0
    assert out.metrics["train_loss"] > 0


def test_with_the_pld_accountant_the_reported_epsilon_is_dp_accountings_pld() -> None:
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    task = TorchTask(_mlp)
    pld = DPSGDSettings(DP.noise_multiplier, DP.max_grad_norm, DP.delta, Accountant.PLD)
    out = task.train(task.init_weights(0), DATA, SETTINGS, _context(pld, rounds=2))
    steps = 2 * math.ceil(400 / 32)  # two rounds of one epoch
    accountant = PLDAccountant()
    event = dp_event.GaussianDpEvent(DP.noise_multiplier)
    accountant.compose(dp_event.PoissonSampledDpEvent(32 / 400, event), steps)
    assert out.metrics["dp_sgd_epsilon"] == pytest.approx(accountant.get_epsilon(DP.delta))
    rdp = site_epsilon(DP, SETTINGS, num_samples=400, rounds=2)
    assert out.metrics["dp_sgd_epsilon"] < rdp  # tighter than Opacus's RDP


def test_epsilon_grows_with_the_rounds_and_shrinks_with_more_noise() -> None:
    task = TorchTask(_mlp)
    w = task.init_weights(0)

    def eps(dp: DPSGDSettings, rounds: int) -> float:
        return float(task.train(w, DATA, SETTINGS, _context(dp, rounds)).metrics["dp_sgd_epsilon"])

    noisier = DPSGDSettings(noise_multiplier=3.0, max_grad_norm=1.0, delta=1e-5)
    assert eps(DP, 1) < eps(DP, 2) < eps(DP, 10)
    assert eps(noisier, 10) < eps(DP, 10)


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_two_rounds_in_one_process_leave_the_model_plain() -> None:
    task = TorchTask(_mlp)
    w = task.init_weights(0)
    keys = list(_mlp().state_dict())
    first = task.train(w, DATA, SETTINGS, _context(rounds=1))
    second = task.train(first.weights, DATA, SETTINGS, _context(rounds=2, seed=8))
    assert list(first.weights) == keys == list(second.weights)  # no "_module." prefix
    model = task.model()
    assert _hooks(model) == 0
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")
    # and plain training afterwards is exactly what a fresh task does
    after = task.train(w, DATA, SETTINGS, _context(None)).weights
    fresh = TorchTask(_mlp).train(w, DATA, SETTINGS, _context(None)).weights
    assert all(np.array_equal(after[k], fresh[k]) for k in keys)


def test_a_huge_noise_multiplier_drowns_the_gradient() -> None:
    loud = DPSGDSettings(noise_multiplier=1e4, max_grad_norm=1.0, delta=1e-5)
    silent = DPSGDSettings(noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5)
    assert _update_norm(loud) > 100 * _update_norm(silent)


def test_a_tiny_clipping_bound_gives_a_tiny_update() -> None:
    tiny = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1e-8, delta=1e-5)
    assert _update_norm(tiny) < 1e-4 * _update_norm(None)


def test_empty_poisson_batches_still_take_a_noised_step() -> None:
    few = SiteData(DATA.x_train[:50], DATA.y_train[:50], DATA.x_val, DATA.y_val)
    settings = TrainSettings(epochs=1, batch_size=1, lr=0.05)  # q = 1/50: ~18 empty batches
    task = TorchTask(_mlp)
    w = task.init_weights(0)
    out = task.train(w, few, settings, _context())
    assert all(np.isfinite(v).all() for v in out.weights.values())
    assert _norm(out.weights, w) > 0
    assert out.metrics["dp_sgd_epsilon"] > 0


def test_plain_training_is_unchanged_without_dp_sgd() -> None:
    task = TorchTask(_mlp)
    w = task.init_weights(0)
    a = task.train(w, DATA, SETTINGS, _context(None))
    b = task.train(w, DATA, SETTINGS, _context(None))
    assert set(a.metrics) == {"train_loss"}
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_fedprox_momentum_and_weight_decay_work_under_dp_sgd() -> None:
    quiet = DPSGDSettings(noise_multiplier=1e-3, max_grad_norm=1.0, delta=1e-5)

    def drift(mu: float) -> float:
        s = TrainSettings(epochs=3, batch_size=16, lr=0.1, proximal_mu=mu)
        return _update_norm(quiet, s)

    assert drift(5.0) < 0.5 * drift(0.0)
    heavy = TrainSettings(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3)
    assert math.isfinite(_update_norm(DP, heavy))


def test_a_model_opacus_cannot_clip_per_record_is_refused() -> None:
    def bn() -> nn.Module:
        return nn.Sequential(nn.Linear(30, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))

    task = TorchTask(bn)
    with pytest.raises(TaskError, match="DP-SGD") as caught:
        task.train(task.init_weights(0), DATA, SETTINGS, _context())
    assert "GroupNorm" in str(caught.value)
    assert _hooks(task.model()) == 0


def test_a_task_without_per_record_gradients_refuses_dp_sgd() -> None:
    assert TorchTask.supports_dp_sgd
    require_no_dp_sgd(_context(None), "NumpyTask")  # nothing asked: nothing to refuse
    with pytest.raises(TaskError, match=r"needs a torch task"):
        require_no_dp_sgd(_context(), "NumpyTask")


def test_noise_does_not_follow_the_plan_seed() -> None:
    task = TorchTask(_mlp)
    w = task.init_weights(0)
    torch.manual_seed(0)
    a = task.train(w, DATA, SETTINGS, _context(seed=3)).weights
    b = task.train(w, DATA, SETTINGS, _context(seed=3)).weights
    assert not all(np.array_equal(a[k], b[k]) for k in a)
