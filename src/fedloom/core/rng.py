"""Deterministic randomness keyed by purpose.

Every random choice of the federation comes from :func:`generator`, keyed by
``(seed, round, site, purpose)``: the same key gives the same stream in any process,
on any machine, in any order of calls. Privacy noise and secure-aggregation masks must
never come from here: they need secret randomness (``secrets`` / ``os.urandom``).
"""

from __future__ import annotations

import hashlib

import numpy as np


def seed_words(seed: int, round: int, site: str, purpose: str) -> list[int]:
    """Four 32-bit words derived from the key by sha256 (stable across platforms)."""
    key = f"{seed}\x1f{round}\x1f{site}\x1f{purpose}".encode()
    digest = hashlib.sha256(key).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def generator(seed: int, round: int = 0, site: str = "", purpose: str = "") -> np.random.Generator:
    """A fresh PCG64 generator for the key ``(seed, round, site, purpose)``."""
    return np.random.Generator(np.random.PCG64(seed_words(seed, round, site, purpose)))


def int_seed(seed: int, round: int = 0, site: str = "", purpose: str = "") -> int:
    """A 63-bit integer seed for libraries that take one (torch.manual_seed)."""
    w = seed_words(seed, round, site, purpose)
    return ((w[0] << 32) | w[1]) & ((1 << 63) - 1)


def select_sites(roster: list[str], count: int, seed: int, round: int) -> list[str]:
    """``count`` sites drawn from the plan's roster for ``round``, sorted by name.

    Depends only on the roster, the seed and the round, never on who is connected.
    """
    ordered = sorted(roster)
    if count >= len(ordered):
        return ordered
    rng = generator(seed, round, "", "select")
    picked = rng.choice(len(ordered), size=count, replace=False)
    return sorted(ordered[i] for i in picked)
