"""Partitioners: exact cover, determinism by key, skew, and the text form of a spec."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fedloom.data
from fedloom.core.rng import generator
from fedloom.data import (
    PartitionKind,
    PartitionSpec,
    dirichlet,
    iid,
    parse_partition,
    partition,
    quantity_skew,
    shards,
    train_val_split,
)

Run = Callable[[np.ndarray, int, np.random.Generator], list[np.ndarray]]

# Each partitioner, called so that it always succeeds (dirichlet with min_size=0).
PARTITIONERS: dict[str, Run] = {
    "iid": lambda y, n, rng: iid(y.size, n, rng),
    "dirichlet": lambda y, n, rng: dirichlet(y, n, 0.5, rng, min_size=0),
    "shards": lambda y, n, rng: shards(y, n, 2, rng=rng),
    "quantity": lambda y, n, rng: quantity_skew(y.size, n, 0.5, rng),
}

fast = settings(max_examples=40, deadline=None)


@st.composite
def labelled(draw: st.DrawFn, min_sites: int = 1, min_per_site: int = 2) -> tuple[np.ndarray, int]:
    """Labels of 1..10 classes and a number of sites they can fill (2+ samples each)."""
    num_sites = draw(st.integers(min_sites, 12))
    size = draw(st.integers(num_sites * min_per_site, 300))
    classes = draw(st.integers(1, 10))
    labels = draw(hnp.arrays(np.int64, size, elements=st.integers(0, classes - 1)))
    return labels, num_sites


def check_exact_cover(parts: list[np.ndarray], num_samples: int, num_sites: int) -> None:
    assert len(parts) == num_sites
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert np.all(np.diff(part) > 0), "each site's indices sorted, no repeats"
    pooled = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(pooled, np.arange(num_samples))


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@fast
@given(case=labelled(), seed=st.integers(0, 2**32))
def test_every_index_lands_on_exactly_one_site(
    name: str, case: tuple[np.ndarray, int], seed: int
) -> None:
    labels, num_sites = case
    parts = PARTITIONERS[name](labels, num_sites, generator(seed, 0, "", "partition"))
    check_exact_cover(parts, labels.size, num_sites)
    if name == "quantity":
        assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@fast
@given(case=labelled(), seed=st.integers(0, 2**32))
def test_same_key_gives_same_partition(name: str, case: tuple[np.ndarray, int], seed: int) -> None:
    labels, num_sites = case
    first = PARTITIONERS[name](labels, num_sites, generator(seed, 0, "", "partition"))
    again = PARTITIONERS[name](labels, num_sites, generator(seed, 0, "", "partition"))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@fast
@given(
    case=labelled(min_sites=5, min_per_site=20),
    seeds=st.tuples(st.integers(0, 99), st.integers(0, 99)),
)
def test_different_seed_gives_different_partition(
    name: str, case: tuple[np.ndarray, int], seeds: tuple[int, int]
) -> None:
    # 100+ samples on 5+ sites (10+ shards): two seeds agree with negligible probability.
    assume(seeds[0] != seeds[1])
    labels, num_sites = case
    one, two = (
        PARTITIONERS[name](labels, num_sites, generator(s, 0, "", "partition")) for s in seeds
    )
    assert any(not np.array_equal(a, b) for a, b in zip(one, two, strict=True))


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=classes) / labels.size
    local = np.stack([np.bincount(labels[p], minlength=classes) / p.size for p in parts])
    return float(0.5 * np.abs(local - overall).sum(axis=1).mean())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_small_alpha_skews_labels_more_than_large_alpha(seed: int) -> None:
    labels = np.repeat(np.arange(10), 100)
    skewed = label_skew(labels, dirichlet(labels, 10, 0.1, generator(seed, 0, "", "a")))
    nearly_iid = label_skew(labels, dirichlet(labels, 10, 100.0, generator(seed, 0, "", "b")))
    assert skewed > 0.4 > 0.15 > nearly_iid


@settings(max_examples=25, deadline=None)
@given(
    num_sites=st.integers(1, 6),
    per_site=st.integers(1, 4),
    shard_size=st.integers(1, 8),
    data=st.data(),
)
def test_shards_give_each_site_at_most_shards_per_site_labels(
    num_sites: int, per_site: int, shard_size: int, data: st.DataObject
) -> None:
    num_shards = num_sites * per_site
    classes = data.draw(
        st.sampled_from([c for c in range(1, num_shards + 1) if num_shards % c == 0])
    )
    labels = np.repeat(np.arange(classes), num_shards // classes * shard_size)
    parts = shards(labels, num_sites, per_site, rng=generator(data.draw(st.integers(0, 99))))
    check_exact_cover(parts, labels.size, num_sites)
    assert all(np.unique(labels[p]).size <= per_site for p in parts)
    assert all(p.size == per_site * shard_size for p in parts)


def test_shards_are_dealt_at_random_and_filled_at_random() -> None:
    # McMahan et al.'s setting: 10 equal classes, 2 shards of one label per site.
    labels = np.repeat(np.arange(10), 100)
    parts = shards(labels, 10, 2, rng=generator(0, 0, "", "partition"))
    label_counts = [np.unique(labels[p]).size for p in parts]
    assert max(label_counts) == 2 and sum(label_counts) > 10
    # Within one label, a shard's members are drawn at random, not a contiguous run.
    parts = shards(np.zeros(1000, np.int64), 5, 2, rng=generator(0, 0, "", "partition"))
    assert all(np.count_nonzero(np.diff(p) > 1) > 10 for p in parts)


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(0.3, 10.0), seed=st.integers(0, 2**32))
def test_dirichlet_respects_min_size(alpha: float, seed: int) -> None:
    labels = np.repeat(np.arange(10), 100)
    default = dirichlet(labels, 10, alpha, generator(seed))  # default min(10, 1000 // 20)
    assert min(p.size for p in default) >= 10
    explicit = dirichlet(labels, 5, max(alpha, 1.0), generator(seed), min_size=80)
    assert min(p.size for p in explicit) >= 80


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ValueError, match="use a larger alpha or fewer sites"):
        dirichlet(labels, 20, 0.05, generator(0), min_size=5)
    with pytest.raises(ValueError, match="min_size must be between 0 and 5"):
        dirichlet(labels, 20, 1.0, generator(0), min_size=6)


@pytest.mark.parametrize(
    "call",
    [
        lambda rng: iid(3, 4, rng),
        lambda rng: iid(3, 0, rng),
        lambda rng: shards(np.zeros(7, np.int64), 4, 2, rng=rng),
        lambda rng: quantity_skew(10, 2, 0.0, rng),
        lambda rng: dirichlet(np.zeros((2, 2), np.int64), 1, 1.0, rng),
    ],
)
def test_impossible_requests_raise_value_error(
    call: Callable[[np.random.Generator], object],
) -> None:
    with pytest.raises(ValueError):
        call(generator(0))


@fast
@given(size=st.integers(1, 200), val_fraction=st.floats(0.0, 0.99), seed=st.integers(0, 99))
def test_train_val_split(size: int, val_fraction: float, seed: int) -> None:
    indices = np.arange(1000, 1000 + 3 * size, 3)
    train, val = train_val_split(indices, val_fraction, generator(seed))
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), indices)
    assert train.size >= 1 and np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    if val_fraction == 0:
        assert val.size == 0
    elif size > 1:
        assert val.size == min(max(1, round(size * val_fraction)), size - 1)
    again = train_val_split(indices, val_fraction, generator(seed))
    np.testing.assert_array_equal(again[1], val)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("iid", PartitionSpec(PartitionKind.IID)),
        (" IID ", PartitionSpec(PartitionKind.IID)),
        ("dirichlet:0.3", PartitionSpec(PartitionKind.DIRICHLET, alpha=0.3)),
        ("dirichlet: 1e-2", PartitionSpec(PartitionKind.DIRICHLET, alpha=0.01)),
        ("shards", PartitionSpec(PartitionKind.SHARDS, shards_per_site=2)),
        ("shards:3", PartitionSpec(PartitionKind.SHARDS, shards_per_site=3)),
        ("quantity:0.5", PartitionSpec(PartitionKind.QUANTITY, alpha=0.5)),
    ],
)
def test_parse_partition_accepts(text: str, spec: PartitionSpec) -> None:
    assert parse_partition(text) == spec
    assert parse_partition(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    ["", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:nan", "dirichlet:x",
     "quantity", "quantity:inf", "shards:0", "shards:1.5", "iid:2", "label-skew:0.3"],
)  # fmt: skip
def test_parse_partition_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        parse_partition(text)
    for form in ("'iid'", "dirichlet:<alpha>", "shards:<per site>", "quantity:<alpha>"):
        assert form in str(info.value)


def test_spec_checks_its_own_fields() -> None:
    with pytest.raises(ValueError, match="needs an alpha"):
        PartitionSpec(PartitionKind.DIRICHLET)
    with pytest.raises(ValueError, match="takes no alpha"):
        PartitionSpec(PartitionKind.IID, alpha=1.0)


@pytest.mark.parametrize(
    ("text", "direct"),
    [
        ("iid", lambda y, rng: iid(y.size, 7, rng)),
        ("dirichlet:0.5", lambda y, rng: dirichlet(y, 7, 0.5, rng)),
        ("shards:3", lambda y, rng: shards(y, 7, 3, rng=rng)),
        ("quantity:0.5", lambda y, rng: quantity_skew(y.size, 7, 0.5, rng)),
    ],
)
def test_partition_dispatches_on_the_kind(
    text: str, direct: Callable[..., list[np.ndarray]]
) -> None:
    labels = generator(1).integers(0, 10, 700)
    got = partition(labels, 7, parse_partition(text), generator(2, 0, "", "partition"))
    expected = direct(labels, generator(2, 0, "", "partition"))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_public_names_are_sorted_and_exist() -> None:
    assert fedloom.data.__all__ == sorted(fedloom.data.__all__)
    assert all(hasattr(fedloom.data, name) for name in fedloom.data.__all__)
