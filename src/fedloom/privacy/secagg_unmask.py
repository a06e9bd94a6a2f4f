"""Removing the masks from the aggregator's sum in secure aggregation, as plain
functions: which shares rebuild which secret, the rebuilding, and the subtraction of
every mask left in the sum (see :mod:`~fedloom.privacy.secagg_server`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedloom.privacy import masking, shamir
from fedloom.privacy.secagg import mask_context, stream_offsets, threshold_of


def needs(
    survivors: tuple[str, ...],
    dropped: tuple[str, ...],
    b: Mapping[str, dict[int, bytes]],
    s: Mapping[str, dict[int, bytes]],
    graph: Mapping[str, tuple[str, ...]],
    threshold: float,
) -> list[tuple[str, dict[int, bytes], int]]:
    """``(owner, shares revealed so far, shares needed)`` for each secret to rebuild:
    ``b`` of each survivor, ``s`` of each dropped site."""
    out = []
    for owner in (*survivors, *dropped):
        store = b if owner in survivors else s
        t = threshold_of(len(graph.get(owner, ())), threshold)
        out.append((owner, store.get(owner, {}), t))
    return out


def rebuild(shares: Mapping[int, bytes], degree: int, threshold: float) -> bytes:
    """The secret of a site with ``degree`` neighbours, from its revealed shares."""
    t = threshold_of(degree, threshold)
    return shamir.combine(sorted(shares.items()), threshold=t)


def remove_masks(
    sums: list[np.ndarray],
    seeds: Mapping[str, bytes],
    dropped_keys: Mapping[str, object],
    *,
    graph: Mapping[str, tuple[str, ...]],
    keys: Mapping[str, Mapping[str, str]],
    attempt_id: str,
    bits: int,
) -> list[np.ndarray]:
    """``sums`` less every survivor's own mask and every pairwise mask between a
    survivor and a dropped site (those between survivors cancelled in the sum)."""
    pair_keys = []
    for d, private in dropped_keys.items():
        for i in graph.get(d, ()):
            if i in seeds:  # a survivor that masked with d
                key = masking.agree(
                    private,  # type: ignore[arg-type]
                    bytes.fromhex(keys[i]["s"]),
                    context=mask_context(attempt_id),
                )
                pair_keys.append((masking.pair_sign(i, d), key))
    sizes = [int(s.size) for s in sums]
    out = []
    for total, offset, size in zip(sums, stream_offsets(sizes), sizes, strict=True):
        for seed in seeds.values():
            total -= masking.mask_slice(seed, offset, size, bits)
        for sign, key in pair_keys:
            part = masking.mask_slice(key, offset, size, bits)
            if sign > 0:
                total -= part
            else:
                total += part
        out.append(total)
    return out
