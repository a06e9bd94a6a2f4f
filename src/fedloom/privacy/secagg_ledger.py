"""The aggregator's bookkeeping of one attempt at a round under secure aggregation: who
advertised keys, who sent shares and signed the key set, who survived or dropped, and
the shares revealed so far (see :mod:`~fedloom.privacy.secagg_server`, which holds the
condition around every use)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedloom.privacy import masking
from fedloom.privacy.secagg import dumps
from fedloom.privacy.secagg_unmask import needs, rebuild, remove_masks


@dataclass
class Ledger:
    keys: dict[str, dict[str, str]] = field(default_factory=dict)
    signed: dict[str, dict[str, str]] = field(default_factory=dict)  # certificate, signature
    key_set_signatures: dict[str, str] = field(default_factory=dict)  # over the key set
    outbox: dict[str, dict[str, str]] = field(default_factory=dict)  # sender -> recipient -> blob
    graph: dict[str, tuple[str, ...]] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    b: dict[str, dict[int, bytes]] = field(default_factory=dict)  # owner -> x -> share of b
    s: dict[str, dict[int, bytes]] = field(default_factory=dict)
    revealed: set[str] = field(default_factory=set)

    def counts(self) -> dict[str, object]:
        return {
            "keys": len(self.keys),
            "shares": len(self.outbox),
            "survivors": len(self.survivors),
            "dropped": len(self.dropped),
            "revealed": len(self.revealed),
        }

    def key_set_reply(self, neighbours: int | None, threshold: float) -> bytes:
        """The key set, as every site that advertised its keys in time gets it."""
        return dumps(
            {
                "sites": [
                    {"site": name, **self.keys[name], **self.signed[name]}
                    for name in sorted(self.keys)
                ],
                "neighbours": neighbours,
                "threshold": threshold,
            }
        )

    def shares_reply(self, site: str) -> bytes:
        """The shares addressed to ``site``, and who sent theirs with which signature."""
        inbox = {sender: box[site] for sender, box in sorted(self.outbox.items()) if site in box}
        return dumps(
            {
                "sites": sorted(self.outbox),
                "from": inbox,
                "key_set": {name: self.key_set_signatures[name] for name in self.outbox},
            }
        )

    def store_revealed(self, site: str, x: int, parsed: list[tuple[str, str, bytes]]) -> None:
        for kind, owner, share in parsed:  # all checked: nothing half-stored
            (self.b if kind == "b" else self.s).setdefault(owner, {})[x] = share
        self.revealed.add(site)

    def answered(self, threshold: float) -> bool:
        """Whether every secret can be rebuilt, or every survivor revealed its shares."""
        return self.can_rebuild(threshold) or len(self.revealed) >= len(self.survivors)

    def unmasked(
        self,
        sums: list[np.ndarray],
        b_shares: Mapping[str, dict[int, bytes]],
        s_shares: Mapping[str, dict[int, bytes]],
        *,
        threshold: float,
        attempt_id: str,
        bits: int,
    ) -> list[np.ndarray]:
        """``sums`` less every mask, from the secrets the revealed shares rebuild."""
        seeds = {j: self.rebuild(j, b_shares[j], threshold) for j in self.survivors}
        dropped_keys = {
            d: masking.private_from_bytes(self.rebuild(d, s_shares[d], threshold))
            for d in self.dropped
        }
        return remove_masks(
            sums,
            seeds,
            dropped_keys,
            graph=self.graph,
            keys=self.keys,
            attempt_id=attempt_id,
            bits=bits,
        )

    def needs(self, threshold: float) -> list[tuple[str, dict[int, bytes], int]]:
        return needs(self.survivors, self.dropped, self.b, self.s, self.graph, threshold)

    def can_rebuild(self, threshold: float) -> bool:
        return all(len(shares) >= t for _, shares, t in self.needs(threshold))

    def missing(self, threshold: float) -> list[str]:
        return [
            f"{owner} ({len(shares)} of {t})"
            for owner, shares, t in self.needs(threshold)
            if len(shares) < t
        ]

    def rebuild(self, owner: str, shares: Mapping[int, bytes], threshold: float) -> bytes:
        return rebuild(shares, len(self.graph.get(owner, ())), threshold)
