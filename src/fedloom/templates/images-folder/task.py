"""Handwritten digits stored as PNG files, one folder per site: the data stays on disk.

Each site's folder is in ``ImageFolder`` layout (``<label>/img-00042.png``); a torch
``Dataset`` opens the files with PIL. The loop is the task's own (``TorchLoop``): a small
CNN, AdamW, a cosine learning-rate schedule over the whole federation. ``ctx.keep`` keeps
each site's optimiser and schedule in its state folder from one round to the next.

In a real federation each data owner starts its collaborator with its own folder:
``fedloom collaborator start ... --data /path/to/site/folder``.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedloom import SiteContext, TaskError
from fedloom.tasks import TorchLoop

EPOCHS = 2  # per round
BATCH_SIZE = 32
LR = 1e-2
VAL_EVERY = 5  # every 5th file of a site is its validation split


class PNGFolder(Dataset):
    """PNG images; an image's label is its folder's name (``3/img-00042.png``: a 3)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels).unsqueeze(0), int(path.parent.name)


def png_files(folder: Path | None) -> list[Path]:
    files = sorted(folder.glob("*/*.png")) if folder is not None else []
    if not files:
        raise TaskError(
            f"no PNG images in {folder}/<label>/",
            hint="give each site its folder of images: --data /path/to/site/folder",
        )
    return files


def load_data(ctx: SiteContext) -> tuple[PNGFolder, PNGFolder]:
    files = png_files(ctx.data_path)
    val = files[::VAL_EVERY]
    train = [f for i, f in enumerate(files) if i % VAL_EVERY]
    return PNGFolder(train), PNGFolder(val)


def load_test_data(ctx: SiteContext) -> PNGFolder:
    return PNGFolder(png_files(ctx.data_path))


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def train(model: nn.Module, data: PNGFolder, ctx: SiteContext) -> dict[str, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    total = EPOCHS * max(1, ctx.total_rounds)  # the schedule spans the whole federation
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    ctx.keep(optimizer=optimizer, scheduler=scheduler)
    loader = DataLoader(data, BATCH_SIZE, shuffle=True, generator=ctx.torch_generator())
    for _ in range(EPOCHS):
        total_loss = 0.0
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
        scheduler.step()
    ctx.log_metric("lr", scheduler.get_last_lr()[0])
    return {"train_loss": total_loss / len(data)}


def evaluate(model: nn.Module, data: PNGFolder, ctx: SiteContext) -> dict[str, float]:
    loss, correct = 0.0, 0
    for x, y in DataLoader(data, batch_size=256):
        x, y = x.to(ctx.device), y.to(ctx.device)
        logits = model(x)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"loss": loss / len(data), "accuracy": correct / len(data)}


task = TorchLoop(build_model, train, evaluate, data=load_data, test_data=load_test_data)
