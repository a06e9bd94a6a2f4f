"""The ``segmentation`` template's data: MRI-like volumes with tumour-like blobs, one
file per case, written into the workspace by ``fedloom init``.

Each case is a small 3D volume (one channel) holding a "brain" (an ellipsoid of smooth
tissue texture) with one to three "tumours": ellipsoids with irregular, soft edges and a
contrast that varies from case to case. Its label is the binary tumour mask. The four
hospitals' "scanners" differ in intensity scale and offset, noise, and a bias field (a
smooth intensity gradient across the volume), and the hospitals hold unequal numbers of
cases. The test set mixes every scanner.

Files: ``data/<site>/case-0001.npz`` with ``image`` (float16, shape ``(1, S, S, S)``)
and ``mask`` (uint8, ``(S, S, S)``), written with ``np.savez_compressed`` and read back
with ``np.load(path, allow_pickle=False)``. The same seed writes the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

SIZE = 24  # voxels along each axis
DATA_FOLDER = "data"
TEST_FOLDER = "test"
SEED = 2026


@dataclass(frozen=True)
class Scanner:
    """How one hospital's scanner renders the same anatomy."""

    scale: float  # intensity gain
    offset: float  # intensity offset
    noise: float  # standard deviation of the Gaussian noise (before the gain)
    bias: float  # strength of the bias field: 1 + bias * (a linear ramp in [-1, 1])


# site -> (its scanner, its number of cases): unequal sizes, unequal quality
SITES: dict[str, tuple[Scanner, int]] = {
    "hospital-a": (Scanner(scale=1.0, offset=0.0, noise=0.06, bias=0.0), 40),
    "hospital-b": (Scanner(scale=1.8, offset=0.4, noise=0.10, bias=0.15), 28),
    "hospital-c": (Scanner(scale=0.6, offset=-0.2, noise=0.16, bias=0.35), 18),
    "hospital-d": (Scanner(scale=1.3, offset=0.1, noise=0.30, bias=0.25), 10),
}
TEST_CASES_PER_SCANNER = 6


def case(
    rng: np.random.Generator, scanner: Scanner, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One case: ``(image, mask)``, image float32 ``(1, size, size, size)``, mask uint8
    ``(size, size, size)`` with at least one tumour voxel."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    # the brain: an ellipsoid of smooth tissue texture (grey/white matter-like patches)
    radii = rng.uniform(0.75, 0.92, size=3)
    brain = (((grid / radii[:, None, None, None]) ** 2).sum(0) < 1).astype(np.float32)
    brain = ndimage.gaussian_filter(brain, 0.8)
    texture = ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 2.0)
    texture /= texture.std() + 1e-8
    tissue = brain * (0.5 + 0.08 * texture)
    mask = np.zeros((size,) * 3, dtype=bool)
    image = tissue
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(-0.45, 0.45, size=3)
        axes = rng.uniform(0.18, 0.38, size=3)
        # a distance field distorted by smooth noise: irregular edges
        distance = np.sqrt(
            (((grid - centre[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0)
        )
        wobble = ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 1.5)
        distance = distance + 0.3 * wobble / (np.abs(wobble).max() + 1e-8)
        mask |= distance < 1.0
        contrast = rng.uniform(0.25, 0.7)  # some tumours barely stand out
        soft = 1.0 / (1.0 + np.exp((distance - 1.0) / 0.08))  # soft edge
        image = image + contrast * soft * (0.8 + 0.2 * brain)
    if not mask.any():  # a blob squeezed to nothing by its wobble: mark its centre
        mask[size // 2, size // 2, size // 2] = True
    # the scanner: bias field, noise, gain and offset
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    ramp = np.tensordot(direction, grid, axes=1) / np.sqrt(3)
    image = image * (1.0 + scanner.bias * ramp)
    image = image + rng.normal(scale=scanner.noise, size=image.shape)
    image = scanner.scale * image + scanner.offset
    return image[None].astype(np.float32), mask.astype(np.uint8)


def write_cases(folder: Path, rng: np.random.Generator, scanners: list[Scanner]) -> int:
    """Write one case per scanner in ``scanners`` into ``folder``; return how many."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scanner in enumerate(scanners, start=1):
        image, mask = case(rng, scanner)
        with (folder / f"case-{i:04d}.npz").open("wb") as f:
            np.savez_compressed(f, image=image.astype(np.float16), mask=mask)
    return len(scanners)


def generate(root: Path, seed: int = SEED) -> dict[str, int]:
    """Write every site's cases and the test set under ``root``; return the number of
    cases per folder. Deterministic: each folder has its own generator."""
    written: dict[str, int] = {}
    for index, (site, (scanner, n)) in enumerate(SITES.items()):
        rng = np.random.default_rng([seed, index])
        written[site] = write_cases(root / site, rng, [scanner] * n)
    mixed = [s for s, _ in SITES.values() for _ in range(TEST_CASES_PER_SCANNER)]
    written[TEST_FOLDER] = write_cases(root / TEST_FOLDER, np.random.default_rng([seed, 99]), mixed)
    return written


def prepare(workspace: Path) -> str:
    """``fedloom init``'s hook: write the generated data into ``workspace/data`` and
    say what was written."""
    written = generate(Path(workspace) / DATA_FOLDER)
    counts = ", ".join(f"{name} {n}" for name, n in written.items())
    return (
        f"Wrote {sum(written.values())} generated MRI-like cases ({SIZE}³ voxels) "
        f"into {DATA_FOLDER}/: {counts}"
    )
