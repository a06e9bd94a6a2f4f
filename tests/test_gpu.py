"""Devices: the gpu-marked tests train on a CUDA GPU (skipped without one; `make
test-gpu` runs them); the others check, on any machine, that `device: auto` runs a
plan unchanged on a CPU-only machine and that a device the machine lacks is refused."""

from __future__ import annotations

import numpy as np
import pytest
from workspaces import make_workspace, run_cli

from fedloom import SimulationOptions, load_plan, simulate
from fedloom.core.errors import DeviceError
from fedloom.core.records import LoopSettings, TrainSettings
from fedloom.runtime.devices import resolve_device
from fedloom.tasks import Metrics, SiteContext, SiteData, TorchLoop, TorchTask

torch = pytest.importorskip("torch")
nn = torch.nn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _data(n: int = 256, seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, 8)) + y[:, None]).astype(np.float32)
    cut = n * 3 // 4
    return SiteData(x[:cut], y[:cut], x[cut:], y[cut:])


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def _context(device: str, **loop: object) -> SiteContext:
    return SiteContext("site-a", 0, 1, 7, total_rounds=3, device=device, loop=LoopSettings(**loop))


def _user_train(model: nn.Module, data: object, ctx: SiteContext) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(data, batch_size=32, generator=ctx.torch_generator())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in loader:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device))
        loss.backward()
        opt.step()
    return {"on_device": float(next(model.parameters()).device.type == ctx.device.split(":")[0])}


def _user_evaluate(model: nn.Module, data: object, ctx: SiteContext) -> dict[str, float]:
    x, y = data.tensors  # type: ignore[attr-defined]
    hits = model(x.to(ctx.device)).argmax(1).cpu() == y
    return {"accuracy": hits.float().mean().item()}


def _fingerprint(weights: dict[str, np.ndarray]) -> bytes:
    return b"".join(np.ascontiguousarray(a).tobytes() for a in weights.values())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_task_trains_on_the_gpu(precision: str) -> None:
    task = TorchTask(_model)
    weights = task.init_weights(0)
    ctx = _context(resolve_device("auto"), precision=precision, optimizer="adamw")
    assert ctx.device == "cuda"
    out = task.train(weights, _data(), TrainSettings(epochs=3, batch_size=32, lr=0.01), ctx)
    assert all(a.dtype == weights[k].dtype for k, a in out.weights.items())  # back on the CPU
    got = task.evaluate(out.weights, _data().val, ctx).metrics
    assert got["accuracy"] > 0.6 and np.isfinite(got["loss"])


@pytest.mark.gpu
@cuda
def test_the_users_own_loop_runs_on_the_gpu_and_deterministic_mode_repeats() -> None:
    task = TorchLoop(_model, _user_train, _user_evaluate, metrics=Metrics())
    weights = task.init_weights(0)
    runs = []
    for _ in range(2):
        ctx = _context("cuda", deterministic=True)
        out = task.train(weights, _data(), TrainSettings(), ctx)
        assert out.metrics["on_device"] == 1.0
        runs.append(_fingerprint(out.weights))
    assert runs[0] == runs[1]
    assert task.evaluate(weights, _data().val, _context("cuda")).metrics["accuracy"] >= 0.0


@pytest.mark.gpu
@cuda
def test_gpu_memory_is_given_back_between_sites() -> None:
    from fedloom.runtime.devices import release_memory

    task = TorchTask(_model)
    weights = task.init_weights(0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    task.train(weights, _data(), TrainSettings(epochs=1), _context("cuda"))
    release_memory("cuda")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 4096  # the model waits on the CPU


def test_device_auto_runs_the_same_plan_unchanged_on_this_machine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`device: auto` is this machine's best device (the CPU on a CPU-only machine), and
    the plan trains there exactly as with that device named."""
    best = resolve_device("auto")
    assert best in (("cuda",) if torch.cuda.is_available() else ("cpu", "mps"))
    ws = make_workspace(tmp_path, "digits")
    finals = []
    for device in ("auto", best):
        overrides = ["rounds=1", "sites=2", f"training.device={device}"]
        plan = load_plan(ws, [*overrides, "training.deterministic=true"])
        result = simulate(ws, plan, SimulationOptions(workers=0))
        finals.append(_fingerprint(result.final_weights))
    assert finals[0] == finals[1]


@pytest.mark.process
def test_a_device_this_machine_lacks_is_refused_with_exit_3(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The first CUDA device past the machine's last (cuda:0 where there is none)."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = f"cuda:{have}"
    why = "sees no CUDA GPU" if have == 0 else f"has {have} CUDA GPU"
    with pytest.raises(DeviceError, match=why):
        resolve_device(missing)
    ws = make_workspace(tmp_path, "digits")
    proc = run_cli(
        "simulate", str(ws), "--workers", "1", "--quiet", "rounds=1", f"training.device={missing}"
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"device '{missing}' asked for" in proc.stderr and "training.device" in proc.stderr
