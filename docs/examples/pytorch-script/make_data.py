"""Sample data for the guide: scikit-learn's handwritten digits as PNG files.

    python make_data.py DEST [--sites 3] [--per-site 400]

writes DEST/site-01 .. DEST/site-NN, each with train/<label>/*.png and test/<label>/*.png
(what train.py reads, and what each site's collaborator is given with --data), and
DEST/test/<label>/*.png, the federation's held-out test set.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write(folder: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    for image, label, i in zip(images, labels, ids, strict=True):
        path = folder / str(label) / f"img-{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--per-site", type=int, default=400, help="images per site")
    args = parser.parse_args()
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    test, rest = order[:300], order[300:]
    write(args.dest / "test", images[test], digits.target[test], test)
    for s in range(args.sites):
        mine = rest[s * args.per_site : (s + 1) * args.per_site]
        cut = len(mine) * 4 // 5
        site = args.dest / f"site-{s + 1:02d}"
        write(site / "train", images[mine[:cut]], digits.target[mine[:cut]], mine[:cut])
        write(site / "test", images[mine[cut:]], digits.target[mine[cut:]], mine[cut:])
    print(f"wrote {args.sites} site folders and test/ to {args.dest}")


if __name__ == "__main__":
    main()
