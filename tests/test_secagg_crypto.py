"""The cryptographic building blocks of secure aggregation: Shamir sharing, key agreement,
mask streams, the masking graph and share encryption."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.errors import AggregationError
from fedloom.privacy import masking, shamir

# --- Shamir -----------------------------------------------------------------------------


def test_every_threshold_subset_rebuilds_the_secret() -> None:
    secret = b"mask seed of site-3 for round 7, thirty-two"
    shares = shamir.split(secret, shares=5, threshold=3)
    assert [x for x, _ in shares] == [1, 2, 3, 4, 5]
    assert all(len(value) == shamir.SHARE_BYTES for _, value in shares)
    for size in range(3, 6):
        for subset in itertools.combinations(shares, size):
            assert shamir.combine(list(subset), threshold=3) == secret
            assert shamir.combine(list(reversed(subset)), threshold=3) == secret


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    n=st.integers(min_value=1, max_value=30),
    data=st.data(),
)
def test_random_subsets_rebuild_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(min_value=1, max_value=n))
    size = data.draw(st.integers(min_value=threshold, max_value=n))
    shares = shamir.split(secret, shares=n, threshold=threshold)
    subset = data.draw(st.permutations(shares))[:size]
    assert shamir.combine(subset, threshold=threshold) == secret


def test_leading_zero_bytes_survive() -> None:
    for secret in (b"\x00", b"\x00" * 64, b"\x00\x00\x07", b"\x01\x00"):
        shares = shamir.split(secret, shares=4, threshold=2)
        assert shamir.combine(shares[2:], threshold=2) == secret


def test_fewer_than_threshold_shares_raise() -> None:
    shares = shamir.split(b"secret", shares=5, threshold=3)
    with pytest.raises(AggregationError, match="2 shares: 3 are needed"):
        shamir.combine(shares[:2], threshold=3)


def test_fewer_than_threshold_shares_reveal_nothing_useful() -> None:
    # With threshold 3, two shares are consistent with any secret: interpolating a line
    # through them does not give the secret back.
    secret = b"secret"
    shares = shamir.split(secret, shares=5, threshold=3)
    try:
        rebuilt = shamir.combine(shares[:2], threshold=2)
    except AggregationError:
        return  # almost always: the interpolated value lacks the 0x01 prefix
    assert rebuilt != secret


def test_a_corrupted_extra_share_is_detected() -> None:
    shares = shamir.split(b"secret", shares=5, threshold=3)
    x, value = shares[4]
    corrupted = ((int.from_bytes(value, "big") + 1) % shamir.PRIME).to_bytes(66, "big")
    with pytest.raises(AggregationError, match="share x=5 does not lie on the polynomial"):
        shamir.combine([*shares[:4], (x, corrupted)], threshold=3)


def test_a_corrupted_base_share_is_detected_by_an_extra_one() -> None:
    shares = shamir.split(b"secret", shares=4, threshold=3)
    value = int.from_bytes(shares[0][1], "big")
    bad = ((value + 1) % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")
    with pytest.raises(AggregationError, match="share x=4 does not lie"):
        shamir.combine([(1, bad), *shares[1:]], threshold=3)


def test_shares_of_different_secrets_do_not_mix() -> None:
    first = shamir.split(b"first", shares=4, threshold=2)
    second = shamir.split(b"second", shares=4, threshold=2)
    with pytest.raises(AggregationError, match="does not lie on the polynomial"):
        shamir.combine([first[0], first[1], second[2]], threshold=2)


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        ([(1, bytes(66)), (1, bytes(66))], "x=1 appears more than once"),
        ([(0, bytes(66)), (2, bytes(66))], "x=0 is outside"),
        ([(1, bytes(65)), (2, bytes(66))], "x=1 has 65 bytes instead of 66"),
        ([(1, b"\xff" * 66), (2, bytes(66))], "x=1 has a value outside the field"),
    ],
)
def test_malformed_shares_raise(shares: list[tuple[int, bytes]], message: str) -> None:
    with pytest.raises(AggregationError, match=message):
        shamir.combine(shares, threshold=2)


def test_a_value_without_the_prefix_is_refused() -> None:
    # A constant polynomial whose value is zero decodes to no 0x01 prefix.
    with pytest.raises(AggregationError, match="not well formed"):
        shamir.combine([(1, bytes(66)), (2, bytes(66))], threshold=2)


@pytest.mark.parametrize(
    ("secret", "shares", "threshold"),
    [(b"", 3, 2), (bytes(65), 3, 2), (b"s", 3, 0), (b"s", 3, 4)],
)
def test_split_refuses_bad_arguments(secret: bytes, shares: int, threshold: int) -> None:
    with pytest.raises(ValueError):
        shamir.split(secret, shares=shares, threshold=threshold)


def test_splitting_is_randomised() -> None:
    assert shamir.split(b"s", shares=3, threshold=2) != shamir.split(b"s", shares=3, threshold=2)


# --- key agreement ----------------------------------------------------------------------


def test_agree_is_symmetric_and_bound_to_its_context() -> None:
    alice, bob, carol = masking.new_key_pair(), masking.new_key_pair(), masking.new_key_pair()
    assert len(alice.public) == 32
    key = masking.agree(alice.private, bob.public, context=b"round-1/mask")
    assert len(key) == 32
    assert key == masking.agree(bob.private, alice.public, context=b"round-1/mask")
    assert key != masking.agree(alice.private, bob.public, context=b"round-2/mask")
    assert key != masking.agree(alice.private, carol.public, context=b"round-1/mask")


def test_agree_refuses_a_malformed_public_key() -> None:
    pair = masking.new_key_pair()
    with pytest.raises(AggregationError, match="31 bytes instead of 32"):
        masking.agree(pair.private, pair.public[:31], context=b"x")
    with pytest.raises(AggregationError, match="unusable"):
        masking.agree(pair.private, bytes(32), context=b"x")  # a low-order point


def test_private_key_round_trips_through_shamir() -> None:
    pair, peer = masking.new_key_pair(), masking.new_key_pair()
    raw = masking.private_bytes(pair.private)
    assert len(raw) == 32
    rebuilt = masking.private_from_bytes(
        shamir.combine(shamir.split(raw, shares=5, threshold=3)[1:4], threshold=3)
    )
    context = b"round-1/mask"
    assert masking.agree(rebuilt, peer.public, context=context) == masking.agree(
        pair.private, peer.public, context=context
    )


# --- mask streams -----------------------------------------------------------------------

SEED = bytes(range(32))
STREAM_LENGTH = 600
_LONG = {bits: masking.mask_slice(SEED, 0, STREAM_LENGTH, bits) for bits in (32, 64)}


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    start=st.integers(min_value=0, max_value=STREAM_LENGTH),
    data=st.data(),
)
def test_any_slice_equals_the_same_range_of_the_stream(
    bits: int, start: int, data: st.DataObject
) -> None:
    count = data.draw(st.integers(min_value=0, max_value=STREAM_LENGTH - start))
    piece = masking.mask_slice(SEED, start, count, bits)
    assert piece.dtype == (np.uint32 if bits == 32 else np.uint64)
    assert piece.shape == (count,)
    np.testing.assert_array_equal(piece, _LONG[bits][start : start + count])


def test_the_stream_is_the_chacha20_keystream_read_little_endian() -> None:
    encryptor = Cipher(algorithms.ChaCha20(SEED, bytes(16)), mode=None).encryptor()
    keystream = encryptor.update(bytes(256))
    np.testing.assert_array_equal(_LONG[64][:32], np.frombuffer(keystream, dtype="<u8"))
    np.testing.assert_array_equal(_LONG[32][:64], np.frombuffer(keystream, dtype="<u4"))


def test_chunks_concatenate_to_the_whole_mask() -> None:
    bounds = [0, 1, 17, 100, 255, 256, 599, 600]
    for bits in (32, 64):
        chunks = [masking.mask_slice(SEED, a, b - a, bits) for a, b in itertools.pairwise(bounds)]
        np.testing.assert_array_equal(np.concatenate(chunks), _LONG[bits])


def test_masks_are_writable_and_depend_on_the_seed() -> None:
    mask = masking.mask_slice(SEED, 3, 10, 64)
    mask += 1  # callers add their update in place
    other = masking.mask_slice(bytes(32), 0, STREAM_LENGTH, 64)
    assert not np.array_equal(other, _LONG[64])


def test_far_slices_work_and_the_end_of_the_stream_is_refused() -> None:
    last = 2**32 * 64 // 8  # elements of a 64-bit stream
    assert masking.mask_slice(SEED, last - 4, 4, 64).shape == (4,)
    with pytest.raises(ValueError, match="past the end"):
        masking.mask_slice(SEED, last - 4, 5, 64)


@pytest.mark.parametrize(
    ("seed", "start", "count", "bits"),
    [(bytes(31), 0, 1, 64), (SEED, 0, 1, 16), (SEED, -1, 1, 32), (SEED, 0, -1, 32)],
)
def test_mask_slice_refuses_bad_arguments(seed: bytes, start: int, count: int, bits: int) -> None:
    with pytest.raises(ValueError):
        masking.mask_slice(seed, start, count, bits)


# --- masking graph ----------------------------------------------------------------------


def _sites(n: int) -> list[str]:
    names = [f"site-{i:02d}" for i in range(n)]
    random.Random(n).shuffle(names)  # the graph must not depend on the given order
    return names


def _assert_well_formed(graph: dict[str, tuple[str, ...]], sites: list[str]) -> None:
    assert set(graph) == set(sites)
    for site, others in graph.items():
        assert site not in others
        assert list(others) == sorted(set(others))
        for other in others:
            assert site in graph[other], f"{site} -> {other} is not symmetric"


@pytest.mark.parametrize(
    ("n", "k"),
    [(6, 2), (7, 2), (6, 3), (8, 3), (10, 4), (10, 5), (12, 7), (20, 6), (30, 9), (9, 6)],
)
def test_harary_graph_is_symmetric_and_k_regular(n: int, k: int) -> None:
    sites = _sites(n)
    graph = masking.neighbours(sites, k)
    _assert_well_formed(graph, sites)
    assert all(len(others) == k for others in graph.values())
    assert graph == masking.neighbours(sorted(sites), k)


@pytest.mark.parametrize(("n", "k"), [(5, 3), (7, 3), (9, 5), (11, 3), (21, 7), (9, 1)])
def test_harary_graph_with_odd_k_and_odd_n(n: int, k: int) -> None:
    sites = _sites(n)
    graph = masking.neighbours(sites, k)
    _assert_well_formed(graph, sites)
    degrees = sorted(len(others) for others in graph.values())
    # n * k is odd, so no graph is k-regular: exactly one site has one extra neighbour.
    assert degrees == [k] * (n - 1) + [k + 1]
    assert len(graph[min(sites)]) == k + 1


@pytest.mark.parametrize(("n", "k"), [(6, 2), (7, 3), (8, 3), (12, 4), (13, 5)])
def test_harary_graph_survives_k_minus_one_dropouts(n: int, k: int) -> None:
    sites = _sites(n)
    graph = masking.neighbours(sites, k)
    for dropped in itertools.combinations(sites, k - 1):
        alive = set(sites) - set(dropped)
        start = next(iter(alive))
        seen, frontier = {start}, [start]
        while frontier:
            site = frontier.pop()
            for other in graph[site]:
                if other in alive and other not in seen:
                    seen.add(other)
                    frontier.append(other)
        assert seen == alive


@pytest.mark.parametrize("k", [None, 4, 5, 9])
def test_complete_graph_when_k_is_none_or_large(k: int | None) -> None:
    sites = _sites(5)
    graph = masking.neighbours(sites, k)
    _assert_well_formed(graph, sites)
    for site, others in graph.items():
        assert others == tuple(sorted(set(sites) - {site}))


def test_tiny_rounds() -> None:
    assert masking.neighbours(["a"], None) == {"a": ()}
    assert masking.neighbours(["b", "a"], 1) == {"a": ("b",), "b": ("a",)}
    assert masking.neighbours([], 3) == {}


def test_neighbours_refuses_duplicates_and_bad_k() -> None:
    with pytest.raises(ValueError, match="distinct"):
        masking.neighbours(["a", "b", "a"], None)
    with pytest.raises(ValueError, match="at least 1"):
        masking.neighbours(["a", "b", "c"], 0)


def test_pair_sign_is_antisymmetric() -> None:
    assert masking.pair_sign("a", "b") == 1
    assert masking.pair_sign("b", "a") == -1


# --- pairwise masks cancel --------------------------------------------------------------


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize(("n", "k"), [(5, None), (8, 3), (7, 3), (9, 4), (6, 5)])
def test_pairwise_masks_of_a_round_cancel(bits: int, n: int, k: int | None) -> None:
    sites = _sites(n)
    pairs = {site: masking.new_key_pair() for site in sites}
    graph = masking.neighbours(sites, k)
    dtype = np.uint32 if bits == 32 else np.uint64
    start, count = 123, 257
    total = np.zeros(count, dtype=dtype)
    for site in sites:
        masked = np.zeros(count, dtype=dtype)
        for other in graph[site]:
            seed = masking.agree(pairs[site].private, pairs[other].public, context=b"r1/mask")
            mask = masking.mask_slice(seed, start, count, bits)
            if masking.pair_sign(site, other) > 0:
                masked += mask  # unsigned arithmetic wraps modulo 2**bits
            else:
                masked -= mask
        assert masked.any()  # a site's own masked vector hides its update
        total += masked
    np.testing.assert_array_equal(total, np.zeros(count, dtype=dtype))


# --- share encryption -------------------------------------------------------------------


def test_encrypt_decrypt_round_trip() -> None:
    key = bytes(range(32))
    blob = masking.encrypt(key, b"share bytes", associated=b"site-1->site-2/round-3")
    assert b"share bytes" not in blob
    assert len(blob) == 12 + len(b"share bytes") + 16
    assert masking.decrypt(key, blob, associated=b"site-1->site-2/round-3") == b"share bytes"
    assert masking.encrypt(key, b"x", associated=b"a") != masking.encrypt(
        key, b"x", associated=b"a"
    )


def test_tampering_and_wrong_context_are_detected() -> None:
    key = bytes(range(32))
    blob = masking.encrypt(key, b"share bytes", associated=b"a->b/1")
    for position in (0, 12, len(blob) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(blob)
        tampered[position] ^= 0x40
        with pytest.raises(AggregationError, match="failed its authentication"):
            masking.decrypt(key, bytes(tampered), associated=b"a->b/1")
    with pytest.raises(AggregationError, match="failed its authentication"):
        masking.decrypt(key, blob, associated=b"a->b/2")
    with pytest.raises(AggregationError, match="failed its authentication"):
        masking.decrypt(bytes(32), blob, associated=b"a->b/1")
    with pytest.raises(AggregationError, match="too short"):
        masking.decrypt(key, blob[:20], associated=b"a->b/1")
