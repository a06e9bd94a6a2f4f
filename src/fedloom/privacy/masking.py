"""The cryptographic pieces of SecAgg+ (Bell et al., 2020): key agreement, masks, the
masking graph and the authenticated encryption of secret shares.

Each pair of neighbouring sites agrees on a seed (X25519 then HKDF-SHA256) and expands it
into a mask with ChaCha20; the site whose name sorts first adds the mask, the other
subtracts it, so every pairwise mask cancels in the sum modulo ``2**bits``. Masks are
addressable by element: :func:`mask_slice` returns any range of the stream, so sites and
the aggregator can work chunk by chunk on models larger than memory. Secret shares travel
through the aggregator encrypted with ChaCha20-Poly1305 under the pair's key.

These are pure functions: no I/O, no state, no logging.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedloom.core.errors import AggregationError

KEY_BYTES = 32
NONCE_BYTES = 12
_TAG_BYTES = 16
_BLOCK_BYTES = 64  # one ChaCha20 block
_MAX_BLOCKS = 2**32  # the 32-bit block counter: 256 GiB of stream per seed
_INFO_PREFIX = b"fedloom-secagg/"
_DTYPES: dict[int, np.dtype[np.unsignedinteger[Any]]] = {
    32: np.dtype(np.uint32),
    64: np.dtype(np.uint64),
}


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the 32 raw bytes that are sent to the peers."""

    private: X25519PrivateKey
    public: bytes


def new_key_pair() -> KeyPair:
    """A fresh X25519 key pair (one per site and round: keys are never reused)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return KeyPair(private=private, public=public)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key, so that it can be secret-shared."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """The private key whose raw bytes are ``raw`` (the inverse of :func:`private_bytes`)."""
    if len(raw) != KEY_BYTES:
        raise AggregationError(
            f"a rebuilt private key has {len(raw)} bytes instead of {KEY_BYTES}",
            hint="the shares of a site's mask key are corrupted or incomplete",
        )
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, *, context: bytes) -> bytes:
    """The 32-byte key that this site and the owner of ``peer_public`` share.

    X25519 then HKDF-SHA256 with info ``b"fedloom-secagg/" + context``, so keys derived
    for different purposes (mask seeds, share encryption) or rounds are independent.
    """
    if len(peer_public) != KEY_BYTES:
        raise AggregationError(
            f"a peer's public key has {len(peer_public)} bytes instead of {KEY_BYTES}",
            hint="the peer sent a malformed key; it should be left out of this round",
        )
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # a low-order point: the shared secret would be all zeros
        raise AggregationError(
            f"a peer's public key is unusable for key agreement: {err}",
            hint="the peer sent a malformed key; it should be left out of this round",
        ) from err
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_INFO_PREFIX + context
    ).derive(shared)


def mask_slice(seed: bytes, start: int, count: int, bits: int) -> np.ndarray:
    """Elements ``[start, start + count)`` of the mask stream of ``seed``.

    The stream is the ChaCha20 keystream (key ``seed``, zero nonce) read as little-endian
    unsigned ``bits``-bit integers. Any slice equals the same range of the whole stream,
    so masks can be made chunk by chunk. Returns ``uint32`` or ``uint64``.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a mask seed must be {KEY_BYTES} bytes, not {len(seed)}")
    if bits not in _DTYPES:
        raise ValueError(f"bits must be 32 or 64, not {bits}")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be non-negative, got {start} and {count}")
    dtype = _DTYPES[bits]
    first_byte = start * dtype.itemsize
    block, skip = divmod(first_byte, _BLOCK_BYTES)
    length = skip + count * dtype.itemsize
    if first_byte + count * dtype.itemsize > _MAX_BLOCKS * _BLOCK_BYTES:
        raise ValueError(
            f"elements [{start}, {start + count}) lie past the end of a mask stream "
            f"({_MAX_BLOCKS * _BLOCK_BYTES} bytes)"
        )
    nonce = block.to_bytes(4, "little") + bytes(NONCE_BYTES)
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    buffer = bytearray(length)  # written in place: the array is writable, no copy
    encryptor.update_into(bytes(length), buffer)
    stream = np.frombuffer(buffer, dtype=dtype.newbyteorder("<"), count=count, offset=skip)
    return stream.astype(dtype, copy=False)


def neighbours(sites: Sequence[str], k: int | None) -> dict[str, tuple[str, ...]]:
    """The masking graph of a round: each site's neighbours, sorted.

    ``k`` None, or at least ``n - 1``: every site masks with every other. Otherwise the
    Harary graph H(k, n) on the ring of sorted names, the sparsest graph that stays
    connected when any ``k - 1`` sites drop out. Each site is joined with the ``k // 2``
    nearest on each side; for odd ``k`` and even ``n`` also with the site opposite
    (``i + n/2``). For odd ``k`` and odd ``n`` no graph is ``k``-regular, and as in
    Harary's construction sites ``i = 0 .. (n-1)/2`` are joined with ``i + (n+1)/2``
    (mod n): every site has degree ``k`` except the first, which has ``k + 1``.
    """
    ring = sorted(sites)
    if len(set(ring)) != len(ring):
        raise ValueError("site names must be distinct")
    n = len(ring)
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if k is None or k >= n - 1:
        return {site: tuple(other for other in ring if other != site) for site in ring}
    edges: set[tuple[int, int]] = set()
    for i in range(n):
        for step in range(1, k // 2 + 1):
            edges.add((i, (i + step) % n))
    if k % 2 == 1:
        if n % 2 == 0:
            edges.update((i, i + n // 2) for i in range(n // 2))
        else:
            edges.update((i, (i + (n + 1) // 2) % n) for i in range((n + 1) // 2))
    adjacent: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in edges:
        adjacent[a].add(b)
        adjacent[b].add(a)
    return {ring[i]: tuple(sorted(ring[j] for j in adjacent[i])) for i in range(n)}


def pair_sign(me: str, other: str) -> int:
    """+1 if ``me`` adds the mask it shares with ``other``, -1 if it subtracts it."""
    return 1 if me < other else -1


def encrypt(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 under ``key``: a random 12-byte nonce, then the ciphertext.

    ``associated`` (sender, recipient, round) is authenticated but not sent, so a blob
    replayed into another context fails to decrypt.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, blob: bytes, *, associated: bytes) -> bytes:
    """The plaintext of a blob from :func:`encrypt`; raises if it was tampered with."""
    if len(blob) < NONCE_BYTES + _TAG_BYTES:
        raise AggregationError(
            f"a secret share failed its authentication: {len(blob)} bytes is too short "
            f"for a nonce and a tag ({NONCE_BYTES + _TAG_BYTES})",
            hint="the share was truncated on its way through the aggregator",
        )
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag as err:
        raise AggregationError(
            "a secret share failed its authentication: it was altered, is meant for "
            "another site or round, or was encrypted under another key",
            hint="the aggregator or the network changed the share; distrust this round",
        ) from err
