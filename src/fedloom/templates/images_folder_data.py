"""The ``images-folder`` template's data: scikit-learn's handwritten digits (1,797 8x8
images, shipped with scikit-learn) written as PNG files, one folder per site in the
layout torchvision's ``ImageFolder`` reads (``data/site-01/3/img-00042.png``: label 3,
sample 42), and ``data/test/`` for the held-out test set.

The sites' shares are label-skewed (Dirichlet, alpha 0.5), as hospitals' case mixes
differ. The files are the same at every ``fedloom init``: the split is seeded by the plan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from fedloom.core.rng import generator
from fedloom.data import parse_partition, partition
from fedloom.plan import load_plan

PARTITION = "dirichlet:0.5"
TEST_FRACTION = 0.2


def prepare(workspace: Path) -> str:
    """Write the digits as PNG files under the plan's ``data.path``; say what was written."""
    plan = load_plan(workspace)
    root = workspace / (plan.data.path or "data")
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    order = generator(plan.seed, 0, "", "images-folder test").permutation(len(labels))
    n_test = round(len(labels) * TEST_FRACTION)
    test, pool = order[:n_test], np.sort(order[n_test:])
    rng = generator(plan.seed, 0, "", "images-folder partition")
    shares = partition(labels[pool], len(plan.roster), parse_partition(PARTITION), rng)
    folders = {"test": np.sort(test)}
    folders.update({site: pool[share] for site, share in zip(plan.roster, shares, strict=True)})
    for folder, indices in folders.items():
        for i in indices:
            out = root / folder / str(labels[i]) / f"img-{i:05d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(out)
    sizes = ", ".join(f"{name} {len(ix)}" for name, ix in folders.items())
    rel = root.relative_to(workspace) if root.is_relative_to(workspace) else root
    return f"Wrote {len(labels)} digit images as PNG files to {rel}/ ({sizes})."
