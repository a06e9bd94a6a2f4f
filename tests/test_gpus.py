"""`fedloom simulate --gpus N` on a machine with CUDA: each worker's sites train on its
GPU, and with `training.deterministic: true` two runs give the same weights. Skipped
without CUDA (the refusal without CUDA is tested in test_debugging.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspaces import make_workspace, run_cli

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_TASK = """
import os

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedloom.tasks import TorchLoop


def model():
    return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 2))


def train(model, data, ctx):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in DataLoader(data, batch_size=16, shuffle=True, generator=ctx.torch_generator()):
        x, y = x.to(ctx.device), y.to(ctx.device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {
        "on_cuda": float(next(model.parameters()).is_cuda),
        "visible_gpu": float(os.environ.get("CUDA_VISIBLE_DEVICES", "-1")),
    }


def evaluate(model, data, ctx):
    x, y = data.tensors
    logits = model(x.to(ctx.device))
    loss = nn.functional.cross_entropy(logits, y.to(ctx.device)).item()
    accuracy = (logits.argmax(1).cpu() == y).float().mean().item()
    return {"accuracy": accuracy, "loss": loss}


task = TorchLoop(model, train, evaluate)
"""


def test_gpus_puts_each_workers_sites_on_its_gpu_and_deterministic_mode_repeats(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    (ws / "task.py").write_text(GPU_TASK)
    gpus = str(torch.cuda.device_count())
    finals = []
    for name in ("first", "second"):
        proc = run_cli(
            "simulate", str(ws), "--gpus", gpus, "--workers", "2", "--quiet",
            "--run-name", name, "rounds=2", "training.deterministic=true",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run = ws / "runs" / name
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in rows if r["kind"] == "train"]
        assert trained and all(r["status"] == "ok" and r["on_cuda"] == 1.0 for r in trained)
        assert {r["visible_gpu"] for r in trained} <= {float(i) for i in range(int(gpus))}
        finals.append((run / "final.safetensors").read_bytes())
    assert finals[0] == finals[1]
