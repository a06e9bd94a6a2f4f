"""Brain-tumour segmentation across hospitals: a small 3D U-Net in plain PyTorch, the
user's own Dataset and training loop, MRI-like volumes read from each site's own folder.

Each site's folder holds one file per case, ``case-0001.npz`` with ``image`` (1, D, H, W)
and ``mask`` (D, H, W). In a simulation the folder is ``data/<site>``; in deployment it
is what the hospital passes to ``fedloom collaborator start --data /path/to/its/cases``.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedloom.tasks import Metrics, TorchLoop

# -- the data: one .npz file per case


class Cases(Dataset):
    """The cases in ``files``, each image normalised on its own (zero mean, unit
    variance): that removes most of a scanner's gain and offset, as in real MRI work."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with np.load(self.files[i], allow_pickle=False) as case:
            image = case["image"].astype(np.float32)
            mask = case["mask"].astype(np.float32)
        image = (image - image.mean()) / (image.std() + 1e-6)
        return torch.from_numpy(image), torch.from_numpy(mask[None])


def load_data(ctx):
    """The site's cases split into training and validation: every fifth case (in file
    name order) validates, so the split is the same at every run."""
    files = sorted(Path(ctx.data_path).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no case-*.npz files in {ctx.data_path}")
    val = files[4::5]
    train = [f for f in files if f not in val]
    return Cases(train), Cases(val)


def load_test_data(ctx):
    return Cases(sorted(Path(ctx.data_path).glob("*.npz")))


# -- the model: a 3D U-Net with two levels


def block(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: no running statistics to average across hospitals whose
    # scanners differ, and it behaves the same with the small batches 3D volumes allow
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.LeakyReLU(0.1),
        nn.Conv3d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.LeakyReLU(0.1),
    )  # fmt: skip


class UNet3D(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2, self.bottom = block(1, c), block(c, 2 * c), block(2 * c, 4 * c)
        self.up2, self.dec2 = nn.ConvTranspose3d(4 * c, 2 * c, 2, stride=2), block(4 * c, 2 * c)
        self.up1, self.dec1 = nn.ConvTranspose3d(2 * c, c, 2, stride=2), block(2 * c, c)
        self.head = nn.Conv3d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        b = self.bottom(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)  # logits, one channel


# -- the loss and the metrics


def dice_bce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    overlap = (prob * mask).sum(dim=(1, 2, 3, 4))
    total = prob.sum(dim=(1, 2, 3, 4)) + mask.sum(dim=(1, 2, 3, 4))
    soft_dice = (2 * overlap + 1) / (total + 1)
    return F.binary_cross_entropy_with_logits(logits, mask) + (1 - soft_dice).mean()


def overlaps(pred: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each case's Dice and IoU of a binary prediction (1 when both are empty)."""
    inter = (pred * mask).sum(dim=(1, 2, 3, 4))
    total = pred.sum(dim=(1, 2, 3, 4)) + mask.sum(dim=(1, 2, 3, 4))
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
    union = total - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return dice, iou


# -- the loop: the user's own


def train(model, dataset, ctx):
    """One round of local training: the plan's epochs, batch size and learning rate,
    AdamW, random flips as augmentation (drawn from the site's seeded generator)."""
    s = ctx.settings
    g = ctx.torch_generator()
    loader = DataLoader(dataset, batch_size=s.batch_size, shuffle=True, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    total, batches = 0.0, 0
    for _ in range(s.epochs):
        for image, mask in loader:
            image, mask = image.to(ctx.device), mask.to(ctx.device)
            for axis in (2, 3, 4):  # flip each axis with probability 1/2
                if torch.rand(1, generator=g).item() < 0.5:
                    image, mask = image.flip(axis), mask.flip(axis)
            loss = dice_bce(model(image), mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return {"train_loss": total / max(batches, 1)}


def evaluate(model, dataset, ctx):
    dice, iou, loss = [], [], 0.0
    for image, mask in DataLoader(dataset, batch_size=8):
        image, mask = image.to(ctx.device), mask.to(ctx.device)
        logits = model(image)
        loss += dice_bce(logits, mask).item() * len(image)
        d, i = overlaps((logits > 0).float(), mask)
        dice.append(d)
        iou.append(i)
    return {
        "dice": torch.cat(dice).mean().item(),
        "iou": torch.cat(iou).mean().item(),
        "loss": loss / len(dataset),
    }


task = TorchLoop(
    UNet3D,
    train,
    evaluate,
    data=load_data,
    test_data=load_test_data,
    metrics=Metrics(primary="dice", lower_is_better=("loss",)),
)
