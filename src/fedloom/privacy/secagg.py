"""Secure aggregation in the spirit of SecAgg+ (Bell et al., 2020): the site's side.

One attempt at a round, seen from a site ``i`` (the aggregator's side is
:mod:`~fedloom.privacy.secagg_server`):

1. **keys** — ``i`` makes two X25519 key pairs for this attempt only: ``c`` to encrypt
   secret shares, ``s`` to agree masks. It sends both public keys and gets back those of
   every site that sent theirs in time (the key set).
2. **shares** — ``i`` draws a 32-byte seed ``b_i`` for its own mask, splits ``b_i`` and
   its mask key ``s_i`` with Shamir's scheme among its neighbours in the key set (every
   other site, or a Harary graph of ``neighbours``), encrypts each neighbour's pair of
   shares to it (ChaCha20-Poly1305, key agreed from the ``c`` keys) and sends them; it
   gets back the shares addressed to it and the sites that completed this step.
3. **masked update** — its update, clipped to ``[-clip_range, clip_range]``, weighted
   and encoded in fixed point modulo ``2**bits`` (:mod:`~fedloom.privacy.quantize`),
   plus ``PRG(b_i)`` plus, for every neighbour ``j`` that completed step 2,
   ``+PRG(s_ij)`` if ``i < j`` else ``-PRG(s_ij)``: ChaCha20 keystreams, the pairwise
   key agreed from the ``s`` keys through HKDF. The pairwise masks cancel in the sum.
4. **unmask** — once the aggregator has closed the uploads it names the survivors (whose
   masked update it holds) and the dropped; ``i`` reveals its shares of ``b_j`` for each
   surviving neighbour and of ``s_d`` for each dropped one, never both for one site,
   and refuses if the two lists overlap or name ``i`` as dropped.

The aggregator is trusted to relay the keys faithfully (honest but curious, as in
Bonawitz et al.'s semi-honest setting): it then learns only the sum. Telling some of a
site's neighbours that it survived and others that it dropped gains it nothing, since
rebuilding both secrets needs two disjoint groups above a threshold of more than half.
But one that hands out public keys of its own making could unmask a site: sites do not
sign their keys with their certificates (the malicious setting's signed keys and
consistency round are not implemented).

Payloads are JSON with hex strings: no pickle, nothing executable.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedloom.errors import AggregationError
from fedloom.privacy import masking, shamir
from fedloom.privacy.quantize import encode
from fedloom.weights import Weights

log = logging.getLogger("fedloom.collaborator")

KEYS, SHARES, UNMASK, REVEAL = "secagg.keys", "secagg.shares", "secagg.unmask", "secagg.reveal"
PHASES = (KEYS, SHARES)  # announced in the instruction; UNMASK and REVEAL follow the upload

Exchange = Callable[[str, bytes], bytes]


def dumps(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def loads(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise AggregationError(f"secure aggregation: the {what} is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise AggregationError(f"secure aggregation: the {what} must be a JSON object")
    return value


def threshold_of(degree: int, fraction: float) -> int:
    """How many of a site's ``degree`` neighbours must reveal a share to rebuild its
    secrets."""
    return max(1, math.ceil(fraction * degree - 1e-9))


def mask_context(task_id: str) -> bytes:
    return f"{task_id}/mask".encode()


def share_context(task_id: str) -> bytes:
    return f"{task_id}/share".encode()


def share_associated(task_id: str, sender: str, recipient: str) -> bytes:
    return f"{task_id}\0{sender}\0{recipient}".encode()


def stream_offsets(sizes: list[int]) -> list[int]:
    """Where each tensor starts in the one stream of masked values."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += size
    return offsets


@dataclass
class _Attempt:
    task_id: str
    mask_keys: masking.KeyPair
    share_keys: masking.KeyPair
    seed: bytes  # b_i
    key_set: dict[str, dict[str, bytes]] = field(default_factory=dict)  # site -> {"c","s"}
    neighbours: tuple[str, ...] = ()
    completed: tuple[str, ...] = ()  # sites that sent their shares (the mask set)
    held: dict[str, tuple[int, bytes, bytes]] = field(default_factory=dict)  # from -> (x, b, s)


class SecureAggregationSite:
    """A site's side of secure aggregation, one attempt at a time."""

    def __init__(self, site: str, roster: tuple[str, ...] | None = None) -> None:
        self.site = site
        self.roster = None if roster is None else frozenset(roster)
        self._attempt: _Attempt | None = None

    def prepare(self, task_id: str, exchange: Exchange) -> None:
        """Steps 1 and 2: agree keys with the round's sites and hand out shares."""
        mask_keys, share_keys = masking.new_key_pair(), masking.new_key_pair()
        attempt = _Attempt(task_id, mask_keys, share_keys, secrets.token_bytes(32))
        reply = loads(
            exchange(
                KEYS,
                dumps({"task": task_id, "c": share_keys.public.hex(), "s": mask_keys.public.hex()}),
            ),
            "key set",
        )
        attempt.key_set = {
            name: {"c": bytes.fromhex(k["c"]), "s": bytes.fromhex(k["s"])}
            for name, k in sorted(reply["sites"].items())
        }
        strangers = sorted(set(attempt.key_set) - self.roster) if self.roster else []
        if strangers:
            raise AggregationError(
                f"secure aggregation: the key set names sites outside the plan: {strangers}; "
                "this site sits the round out"
            )
        mine = attempt.key_set.get(self.site)
        if mine != {"c": share_keys.public, "s": mask_keys.public}:
            raise AggregationError(
                "secure aggregation: the key set does not hold this site's keys as sent "
                "(left out, or replaced); this site sits the round out"
            )
        members = sorted(attempt.key_set)
        graph = masking.neighbours(members, reply.get("neighbours"))
        attempt.neighbours = graph[self.site]
        threshold = threshold_of(len(attempt.neighbours), float(reply["threshold"]))
        index = {name: members.index(name) + 1 for name in members}
        outgoing: dict[str, str] = {}
        b_shares = (
            dict(shamir.split(attempt.seed, shares=len(members), threshold=threshold))
            if attempt.neighbours
            else {}
        )
        s_raw = masking.private_bytes(mask_keys.private)
        s_shares = (
            dict(shamir.split(s_raw, shares=len(members), threshold=threshold))
            if attempt.neighbours
            else {}
        )
        for other in attempt.neighbours:
            x = index[other]
            key = masking.agree(
                share_keys.private, attempt.key_set[other]["c"], context=share_context(task_id)
            )
            plain = dumps({"x": x, "b": b_shares[x].hex(), "s": s_shares[x].hex()})
            blob = masking.encrypt(
                key, plain, associated=share_associated(task_id, self.site, other)
            )
            outgoing[other] = blob.hex()
        reply = loads(exchange(SHARES, dumps({"to": outgoing})), "shares")
        attempt.completed = tuple(sorted(reply["sites"]))
        for sender, blob in sorted(reply["from"].items()):
            if sender not in attempt.neighbours:
                continue
            key = masking.agree(
                share_keys.private, attempt.key_set[sender]["c"], context=share_context(task_id)
            )
            try:
                share = loads(
                    masking.decrypt(
                        key,
                        bytes.fromhex(blob),
                        associated=share_associated(task_id, sender, self.site),
                    ),
                    "share",
                )
                attempt.held[sender] = (
                    int(share["x"]),
                    bytes.fromhex(share["b"]),
                    bytes.fromhex(share["s"]),
                )
            except (AggregationError, KeyError, ValueError, TypeError) as err:
                # a broken sender's share: this site cannot help rebuild its secrets, but
                # still masks with it (its mask key is agreed, not shared)
                log.warning("secure aggregation: the share from %s is unusable: %s", sender, err)
        self._attempt = attempt

    def mask(
        self,
        task_id: str,
        update: Mapping[str, np.ndarray],
        *,
        weight: float,
        clip_range: float,
        frac: int,
        bits: int,
    ) -> Weights:
        """Step 3: ``update`` encoded and masked, tensor by tensor (unsigned ints)."""
        attempt = self._current(task_id)
        pair_keys = [
            (
                masking.pair_sign(self.site, other),
                masking.agree(
                    attempt.mask_keys.private,
                    attempt.key_set[other]["s"],
                    context=mask_context(task_id),
                ),
            )
            for other in attempt.neighbours
            if other in attempt.completed
        ]
        sizes = [int(np.size(v)) for v in update.values()]
        masked: Weights = {}
        for (name, values), offset, size in zip(
            update.items(), stream_offsets(sizes), sizes, strict=True
        ):
            total = encode(values, weight=weight, clip_range=clip_range, frac=frac, bits=bits)
            total += masking.mask_slice(attempt.seed, offset, size, bits)
            for sign, key in pair_keys:
                part = masking.mask_slice(key, offset, size, bits)
                if sign > 0:
                    total += part
                else:
                    total -= part
            masked[name] = total.reshape(np.shape(values))
        return masked

    def unmask(self, task_id: str, exchange: Exchange) -> None:
        """Step 4: reveal the shares the aggregator may have, and no others."""
        attempt = self._current(task_id)
        reply = loads(exchange(UNMASK, dumps({"task": task_id})), "survivor list")
        if "abandoned" in reply:
            self._attempt = None
            return
        survivors, dropped = set(reply["survivors"]), set(reply["dropped"])
        if survivors & dropped or self.site in dropped or self.site not in survivors:
            raise AggregationError(
                "secure aggregation: the aggregator's survivor and dropped lists are "
                f"inconsistent (survivors {sorted(survivors)}, dropped {sorted(dropped)}); "
                "no share was revealed"
            )
        reveal: dict[str, Any] = {"task": task_id, "b": {}, "s": {}}
        for sender, (x, b_share, s_share) in sorted(attempt.held.items()):
            if sender in survivors:
                reveal["b"][sender] = f"{x}:{b_share.hex()}"
            elif sender in dropped:
                reveal["s"][sender] = f"{x}:{s_share.hex()}"
        exchange(REVEAL, dumps(reveal))
        self._attempt = None

    def _current(self, task_id: str) -> _Attempt:
        attempt = self._attempt
        if attempt is None or attempt.task_id != task_id:
            raise AggregationError(
                f"secure aggregation: no key exchange for task {task_id} at this site"
            )
        return attempt
