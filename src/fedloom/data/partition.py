"""Seeded partitioners that split one dataset into realistic non-IID sites.

Each partitioner is a pure function of its inputs and a ``numpy.random.Generator`` (take
one from :func:`fedloom.core.rng.generator`). It returns one array of int64 indices per site,
each sorted ascending; the arrays are disjoint and together cover every index once.
Bad arguments raise ``ValueError``, which the plan validator turns into a plan problem.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Indices = npt.NDArray[np.int64]

DIRICHLET_MAX_DRAWS = 1000
"""How many times :func:`dirichlet` redraws before giving up on ``min_size``."""

ACCEPTED_FORMS = (
    "'iid', 'dirichlet:<alpha>' (e.g. dirichlet:0.3), 'shards' or 'shards:<per site>' "
    "(e.g. shards:2), 'quantity:<alpha>' (e.g. quantity:0.5)"
)


def iid(num_samples: int, num_sites: int, rng: np.random.Generator) -> list[Indices]:
    """Shuffle, then deal sites sizes that differ by at most one."""
    _check_sites(num_samples, num_sites)
    site_of = np.empty(num_samples, dtype=np.int64)
    site_of[rng.permutation(num_samples)] = np.arange(num_samples) * num_sites // num_samples
    return _group(site_of, num_sites)


def dirichlet(
    labels: npt.ArrayLike,
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int | None = None,
) -> list[Indices]:
    """Label skew: each class is shared among sites by proportions drawn from Dir(alpha).

    As in NIID-Bench (Li et al. 2022), a site that already holds its fair share
    ``n / num_sites`` receives nothing from later classes. The whole draw is repeated
    until every site holds at least ``min_size`` samples (default
    ``min(10, n // (2 * num_sites))``), at most :data:`DIRICHLET_MAX_DRAWS` times.
    Small ``alpha`` means strong skew; ``alpha`` near 100 is close to IID.
    """
    y = _labels(labels)
    _check_sites(y.size, num_sites)
    _check_alpha(alpha)
    floor = min(10, y.size // (2 * num_sites)) if min_size is None else min_size
    if not 0 <= floor <= y.size // num_sites:
        raise ValueError(
            f"min_size must be between 0 and {y.size // num_sites} "
            f"({y.size} samples over {num_sites} sites), got {floor}"
        )
    _, inverse, class_sizes = np.unique(y, return_inverse=True, return_counts=True)
    for _ in range(DIRICHLET_MAX_DRAWS):
        counts = _dirichlet_counts(class_sizes, num_sites, alpha, rng)
        if counts.sum(axis=0).min() >= floor:
            break
    else:
        raise ValueError(
            f"dirichlet:{alpha!r} could not give each of {num_sites} sites at least "
            f"{floor} samples in {DIRICHLET_MAX_DRAWS} draws; use a larger alpha or "
            "fewer sites"
        )
    by_class = _by_class(inverse, rng)
    site_of = np.empty(y.size, dtype=np.int64)
    site_of[by_class] = np.repeat(np.tile(np.arange(num_sites), class_sizes.size), counts.ravel())
    return _group(site_of, num_sites)


def shards(
    labels: npt.ArrayLike,
    num_sites: int,
    shards_per_site: int = 2,
    *,
    rng: np.random.Generator,
) -> list[Indices]:
    """Pathological non-IID (McMahan et al. 2017): sort by label, cut into
    ``num_sites * shards_per_site`` equal shards and deal ``shards_per_site`` to each site.

    When every class size is a multiple of the shard size, each shard holds one label,
    so a site sees at most ``shards_per_site`` labels.
    """
    y = _labels(labels)
    if shards_per_site < 1:
        raise ValueError(f"shards_per_site must be at least 1, got {shards_per_site}")
    num_shards = num_sites * shards_per_site
    _check_sites(y.size, num_sites)
    if y.size < num_shards:
        raise ValueError(f"{y.size} samples cannot fill {num_shards} shards")
    _, inverse = np.unique(y, return_inverse=True)
    by_label = _by_class(inverse, rng)
    shard_of_position = np.arange(y.size) * num_shards // y.size
    site_of_shard = np.empty(num_shards, dtype=np.int64)
    site_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // shards_per_site
    site_of = np.empty(y.size, dtype=np.int64)
    site_of[by_label] = site_of_shard[shard_of_position]
    return _group(site_of, num_sites)


def quantity_skew(
    num_samples: int, num_sites: int, alpha: float, rng: np.random.Generator
) -> list[Indices]:
    """IID labels, unequal sizes: each site gets one sample, the rest shared by Dir(alpha)."""
    _check_sites(num_samples, num_sites)
    _check_alpha(alpha)
    shares = rng.dirichlet(np.full(num_sites, alpha))
    sizes = 1 + _split_count(num_samples - num_sites, shares)
    site_of = np.empty(num_samples, dtype=np.int64)
    site_of[rng.permutation(num_samples)] = np.repeat(np.arange(num_sites), sizes)
    return _group(site_of, num_sites)


def train_val_split(
    indices: npt.ArrayLike, val_fraction: float, rng: np.random.Generator
) -> tuple[Indices, Indices]:
    """Split one site's indices into sorted ``(train, val)``.

    ``val`` gets ``round(n * val_fraction)`` samples, at least one when ``val_fraction``
    is positive, but never so many that ``train`` is left empty; it is empty when
    ``val_fraction == 0``.
    """
    pool = np.asarray(indices, dtype=np.int64).ravel()
    if pool.size == 0:
        raise ValueError("cannot split an empty set of indices")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    num_val = 0 if val_fraction == 0 else max(1, round(pool.size * val_fraction))
    num_val = min(num_val, pool.size - 1)
    shuffled = rng.permutation(pool)
    return np.sort(shuffled[num_val:]), np.sort(shuffled[:num_val])


class PartitionKind(enum.Enum):
    IID = "iid"
    DIRICHLET = "dirichlet"
    SHARDS = "shards"
    QUANTITY = "quantity"


@dataclass(frozen=True)
class PartitionSpec:
    """How to split a dataset across sites; ``str(spec)`` is the text form it parses from.

    ``alpha`` is the Dirichlet concentration of ``DIRICHLET`` and ``QUANTITY`` (None for
    the others); ``shards_per_site`` is used by ``SHARDS`` only.
    """

    kind: PartitionKind
    alpha: float | None = None
    shards_per_site: int = 2

    def __post_init__(self) -> None:
        needs_alpha = self.kind in (PartitionKind.DIRICHLET, PartitionKind.QUANTITY)
        if needs_alpha:
            if self.alpha is None:
                raise ValueError(f"partition {self.kind.value} needs an alpha")
            _check_alpha(self.alpha)
        elif self.alpha is not None:
            raise ValueError(f"partition {self.kind.value} takes no alpha")
        if self.shards_per_site < 1:
            raise ValueError(f"shards_per_site must be at least 1, got {self.shards_per_site}")

    def __str__(self) -> str:
        if self.kind is PartitionKind.SHARDS:
            return f"shards:{self.shards_per_site}"
        return self.kind.value if self.alpha is None else f"{self.kind.value}:{self.alpha!r}"


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:0.3``, ``shards``, ``shards:2`` or ``quantity:0.5``."""
    name, sep, arg = (part.strip() for part in text.strip().lower().partition(":"))
    accepted = f"accepted forms: {ACCEPTED_FORMS}"
    try:
        kind = PartitionKind(name)
    except ValueError as err:
        raise ValueError(f"unknown partition {text!r}; {accepted}") from err
    if not sep and kind in (PartitionKind.IID, PartitionKind.SHARDS):
        return PartitionSpec(kind)
    if kind is PartitionKind.IID:
        raise ValueError(f"partition 'iid' takes no argument, got {text!r}; {accepted}")
    if kind is PartitionKind.SHARDS:
        count = _parse_number(arg, int)
        if count is not None and count >= 1:
            return PartitionSpec(kind, shards_per_site=int(count))
        raise ValueError(f"shards per site must be a whole number >= 1 in {text!r}; {accepted}")
    alpha = _parse_number(arg, float)
    if alpha is not None and math.isfinite(alpha) and alpha > 0:
        return PartitionSpec(kind, alpha=float(alpha))
    raise ValueError(f"{kind.value} needs an alpha, a number > 0, in {text!r}; {accepted}")


def partition(
    labels: npt.ArrayLike, num_sites: int, spec: PartitionSpec, rng: np.random.Generator
) -> list[Indices]:
    """Split ``labels``' indices across ``num_sites`` sites as ``spec`` says."""
    return _PARTITIONERS[spec.kind](_labels(labels), num_sites, spec, rng)


_Partitioner = Callable[[Indices, int, PartitionSpec, np.random.Generator], list[Indices]]

_PARTITIONERS: dict[PartitionKind, _Partitioner] = {
    PartitionKind.IID: lambda y, n, spec, rng: iid(y.size, n, rng),
    PartitionKind.DIRICHLET: lambda y, n, spec, rng: dirichlet(y, n, _alpha_of(spec), rng),
    PartitionKind.SHARDS: lambda y, n, spec, rng: shards(y, n, spec.shards_per_site, rng=rng),
    PartitionKind.QUANTITY: lambda y, n, spec, rng: quantity_skew(y.size, n, _alpha_of(spec), rng),
}


def _alpha_of(spec: PartitionSpec) -> float:
    if spec.alpha is None:
        raise ValueError(f"partition {spec.kind.value} needs an alpha")
    return spec.alpha


def _parse_number(text: str, kind: type[int] | type[float]) -> int | float | None:
    try:
        return kind(text)
    except ValueError:
        return None


def _dirichlet_counts(
    class_sizes: npt.NDArray[np.int64], num_sites: int, alpha: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """One draw of the (classes, sites) count matrix, with NIID-Bench's fair-share cap."""
    fair_share = class_sizes.sum() / num_sites
    counts = np.zeros((class_sizes.size, num_sites), dtype=np.int64)
    held = np.zeros(num_sites, dtype=np.int64)
    concentration = np.full(num_sites, alpha)
    for c, size in enumerate(class_sizes):
        open_sites = held < fair_share
        shares = rng.dirichlet(concentration) * open_sites
        if shares.sum() <= 0:  # every open site drew an underflowed zero
            shares = open_sites.astype(np.float64)
        counts[c] = _split_count(int(size), shares)
        held += counts[c]
    return counts


def _split_count(total: int, shares: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Cut ``total`` items into parts proportional to ``shares`` (summing to ``total``)."""
    if not shares.sum() > 0:
        shares = np.ones_like(shares)
    cuts = (np.cumsum(shares / shares.sum())[:-1] * total).astype(np.int64)
    edges = np.concatenate(([0], np.minimum(cuts, total), [total]))
    return np.diff(edges).astype(np.int64)


def _by_class(inverse: npt.NDArray[np.intp], rng: np.random.Generator) -> Indices:
    """All indices grouped by class (in class order), shuffled within each class."""
    shuffled = rng.permutation(inverse.size)
    return shuffled[np.argsort(inverse[shuffled], kind="stable")].astype(np.int64)


def _group(site_of: Indices, num_sites: int) -> list[Indices]:
    """Indices of each site, sorted ascending, from a per-sample site number."""
    order = np.argsort(site_of, kind="stable").astype(np.int64)
    bounds = np.cumsum(np.bincount(site_of, minlength=num_sites))[:-1]
    return np.split(order, bounds)


def _labels(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    return y.astype(np.int64, copy=False)


def _check_sites(num_samples: int, num_sites: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    if num_samples < num_sites:
        raise ValueError(f"{num_samples} samples cannot give each of {num_sites} sites one")


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
