"""Handwritten digits from PNG files: a small CNN, AdamW, a cosine learning-rate schedule.

The data folder holds train/<label>/*.png and test/<label>/*.png.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, Dataset

EPOCHS = 5
BATCH_SIZE = 32
LR = 1e-2


class Digits(Dataset):
    """The PNG images under a folder; an image's label is its folder's name."""

    def __init__(self, folder):
        self.files = sorted(Path(folder).glob("*/*.png"))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255
        return torch.from_numpy(pixels).unsqueeze(0), int(self.files[i].parent.name)


def load(data):
    return Digits(Path(data) / "train"), Digits(Path(data) / "test")


def build_model():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def train_one_epoch(model, loader, optimizer):
    device = next(model.parameters()).device
    model.train()
    total = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
    return total / len(loader.dataset)


@torch.no_grad()
def evaluate(model, dataset):
    device = next(model.parameters()).device
    model.eval()
    loss, correct = 0.0, 0
    for x, y in DataLoader(dataset, batch_size=256):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return {"loss": loss / len(dataset), "accuracy": correct / len(dataset)}


def fit(model, train_set, epochs=EPOCHS):
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True)
    for epoch in range(epochs):
        loss = train_one_epoch(model, loader, optimizer)
        scheduler.step()
        print(f"epoch {epoch + 1}: train loss {loss:.4f}")
    return {"train_loss": loss}


if __name__ == "__main__":
    torch.manual_seed(0)
    train_set, test_set = load(sys.argv[1])
    model = build_model().to("cuda" if torch.cuda.is_available() else "cpu")
    fit(model, train_set)
    print(f"test: {evaluate(model, test_set)}")
