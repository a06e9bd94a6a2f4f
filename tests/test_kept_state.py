"""ctx.keep(): a site's own optimiser and schedule carried across rounds, without pickle."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedloom import SiteContext, TrainSettings
from fedloom.core.errors import TaskError
from fedloom.tasks import TorchLoop
from fedloom.tasks.base import SiteDatasets
from fedloom.tasks.kept_state import KEPT_FILE, decode, encode, load_kept, save_kept
from fedloom.tasks.torch_task import load_weights_into

ROUNDS, EPOCHS = 3, 2


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)


def _epochs(model: nn.Module, data: Any, opt: Any, sched: Any, epochs: int) -> float:
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=16):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        sched.step()
    return float(loss.detach())


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types, tensors bit for bit with the same dtype."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def test_an_adamw_state_round_trips_exactly(tmp_path: Path) -> None:
    model = _model()
    opt = _optimizer(model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    _epochs(model, _data(), opt, sched, 2)
    before = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    assert isinstance(before["optimizer"]["state"][0]["step"], torch.Tensor)
    assert isinstance(before["optimizer"]["param_groups"][0]["betas"], tuple)
    save_kept(tmp_path / KEPT_FILE, {"optimizer": opt, "scheduler": sched})
    after = load_kept(tmp_path / KEPT_FILE)
    assert _same(after, before)
    raw = (tmp_path / KEPT_FILE).read_bytes()
    assert b"pickle" not in raw and b"\x80\x04" not in raw[:16]


def test_the_tree_keeps_every_type() -> None:
    value = {
        "ints": {0: 1, 7: [2, 3.0]},
        "t": (1, (2.5, None), "s"),
        "$odd": True,
        "floats": [float("nan"), float("inf"), -float("inf"), 0.1],
        (1, 2): "tuple key",
        "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "empty": {},
    }
    tensors: dict[str, torch.Tensor] = {}
    assert _same(decode(encode(value, "v", tensors), tensors), value)


def test_an_object_it_cannot_write_is_refused_by_name() -> None:
    with pytest.raises(TaskError, match=r"cannot keep sched\['f'\]: it holds a numpy.float64"):
        encode({"f": np.float64(1.0)}, "sched", {})


def test_keep_needs_a_state_and_a_state_folder(tmp_path: Path) -> None:
    opt = _optimizer(_model())
    nowhere = SiteContext("s", 0, 1, 0)
    assert nowhere.keep(optimizer=opt) is False and nowhere.kept == {}  # the baseline
    ctx = SiteContext("s", 0, 1, 0, state_dir=tmp_path)
    assert ctx.keep(optimizer=opt) is False and ctx.kept == {"optimizer": opt}
    with pytest.raises(TaskError, match="has no state_dict"):
        ctx.keep(model_name="cnn")


def test_a_damaged_file_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / KEPT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    ctx = SiteContext("s", 0, 1, 0, state_dir=tmp_path)
    with pytest.raises(TaskError, match="cannot read the site's kept state") as err:
        ctx.keep(optimizer=_optimizer(_model()))
    assert "delete" in str(err.value.hint)


def _train(keep: bool) -> Any:
    def train(model: nn.Module, data: Any, ctx: SiteContext) -> dict[str, float]:
        opt = _optimizer(model)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * ctx.total_rounds)
        if keep:
            ctx.keep(optimizer=opt, scheduler=sched)
        return {"train_loss": _epochs(model, data, opt, sched, EPOCHS)}

    return train


def _rounds(state: Path, keep: bool) -> dict[str, np.ndarray]:
    task = TorchLoop(_model, _train(keep), lambda m, d: {"n": len(d)})
    weights = task.init_weights(0)
    for r in range(1, ROUNDS + 1):
        ctx = SiteContext("s", 0, r, r, total_rounds=ROUNDS, state_dir=state)
        weights = task.train(weights, SiteDatasets(_data()), TrainSettings(), ctx).weights
    return dict(weights)


def test_kept_optimiser_and_schedule_train_as_one_uninterrupted_run(tmp_path: Path) -> None:
    federated = _rounds(tmp_path / "site", keep=True)
    assert (tmp_path / "site" / KEPT_FILE).is_file()

    model = _model()
    load_weights_into(model, TorchLoop(_model, _train(True), _train(True)).init_weights(0))
    opt = _optimizer(model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * ROUNDS)
    _epochs(model, _data(), opt, sched, EPOCHS * ROUNDS)
    alone = {k: v.numpy() for k, v in model.state_dict().items()}
    assert all(np.array_equal(federated[k], alone[k]) for k in alone)  # bit for bit

    fresh = _rounds(tmp_path / "other", keep=False)  # a new optimiser every round differs
    assert not all(np.array_equal(fresh[k], alone[k]) for k in alone)
