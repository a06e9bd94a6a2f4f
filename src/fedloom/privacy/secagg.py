"""Secure aggregation in the spirit of SecAgg+ (Bell et al., 2020): the site's side.

One attempt at a round, seen from a site ``i`` (the aggregator's side is
:mod:`~fedloom.privacy.secagg_server`):

1. **keys** — ``i`` makes two X25519 key pairs for this attempt only: ``c`` to encrypt
   secret shares, ``s`` to agree masks. It sends both public keys, signed with its
   certificate's key (:func:`~fedloom.privacy.signing.secagg_keys_message`), and its
   certificate; it gets back those of every site that sent theirs in time (the key
   set). It checks every entry: each certificate issued by the federation's CA, valid,
   a site's, naming the site it speaks for; each signature over that site's keys; no
   site twice, none outside the plan, its own keys as sent, at least ``min_sites``
   sites, and the aggregator's threshold and neighbours those of its own plan.
2. **shares** — ``i`` draws a 32-byte seed ``b_i`` for its own mask, splits ``b_i`` and
   its mask key ``s_i`` with Shamir's scheme among its neighbours in the key set (every
   other site, or a Harary graph of ``neighbours``), encrypts each neighbour's pair of
   shares to it (ChaCha20-Poly1305, key agreed from the ``c`` keys) and sends them,
   with its signature over the key set it saw
   (:func:`~fedloom.privacy.signing.secagg_key_set_message`). It gets back the shares
   addressed to it, the sites that completed this step and their signatures over the
   key set they saw; each must verify over the key set ``i`` saw (the consistency
   check: the aggregator cannot show different sites different key sets).
3. **masked update** — its update, clipped to ``[-clip_range, clip_range]``, weighted
   and encoded in fixed point modulo ``2**bits`` (:mod:`~fedloom.privacy.quantize`),
   plus ``PRG(b_i)`` plus, for every neighbour ``j`` that completed step 2,
   ``+PRG(s_ij)`` if ``i < j`` else ``-PRG(s_ij)``: ChaCha20 keystreams, the pairwise
   key agreed from the ``s`` keys through HKDF. The pairwise masks cancel in the sum.
   A site whose checks in steps 1 or 2 failed never gets here: it reports the reason
   and sends no masked update.
4. **unmask** — once the aggregator has closed the uploads it names the survivors (whose
   masked update it holds) and the dropped; ``i`` reveals its shares of ``b_j`` for each
   surviving neighbour and of ``s_d`` for each dropped one, never both for one site,
   and refuses if the two lists overlap or name ``i`` as dropped.

What this protects against (docs/privacy.md, "Trust model", says it for users): an
aggregator that substitutes, drops or duplicates keys, or shows sites different key
sets, is refused by every honest site before any masked update leaves. One that tells
some of a site's neighbours that it survived and others that it dropped gains nothing,
since rebuilding both secrets needs two disjoint groups above a threshold of more than
half (the threshold is the site's own plan's, not the aggregator's word). Not covered:
an aggregator colluding with sites (they reveal their own shares), a stolen site key
(sites check no revocation list), and the sum itself.

Payloads are JSON with hex strings: no pickle, nothing executable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedloom.core.errors import AggregationError
from fedloom.core.weights import Weights
from fedloom.privacy import masking, shamir, signing
from fedloom.privacy.identity import SiteIdentity
from fedloom.privacy.quantize import encode
from fedloom.privacy.secagg_checks import Attempt, check_completed, check_key_set

log = logging.getLogger("fedloom.collaborator")

KEYS, SHARES, UNMASK, REVEAL = "secagg.keys", "secagg.shares", "secagg.unmask", "secagg.reveal"
ANNOUNCED = (KEYS, SHARES)  # in the instruction's exchange steps; UNMASK, REVEAL follow the upload
STEPS = (KEYS, SHARES, UNMASK, REVEAL)  # every exchange step a secure aggregation round takes

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


def mask_context(attempt_id: str) -> bytes:
    return f"{attempt_id}/mask".encode()


def share_context(attempt_id: str) -> bytes:
    return f"{attempt_id}/share".encode()


def share_associated(attempt_id: str, sender: str, recipient: str) -> bytes:
    return f"{attempt_id}\0{sender}\0{recipient}".encode()


def key_set_digest(attempt_id: str, key_set: Mapping[str, Mapping[str, bytes]]) -> bytes:
    """The sha256 of a key set as one site saw it: every site's name and two public keys,
    sorted by name, bound to the attempt. Two sites that saw the same key set compute the
    same digest; any site added, dropped or with other keys changes it."""
    canonical = dumps(
        {
            "attempt": attempt_id,
            "sites": [
                [name, key_set[name]["c"].hex(), key_set[name]["s"].hex()]
                for name in sorted(key_set)
            ],
        }
    )
    return hashlib.sha256(canonical).digest()


def stream_offsets(sizes: list[int]) -> list[int]:
    """Where each tensor starts in the one stream of masked values."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += size
    return offsets


class SecureAggregationSite:
    """A site's side of secure aggregation, one attempt at a time.

    ``identity`` signs this site's keys and holds the CA other sites' certificates must
    chain to; ``threshold`` and ``neighbours`` are the site's own plan's (the
    aggregator's must match); ``min_sites`` is the fewest sites a key set, and the set
    of sites that completed the share step, may hold (the plan's quorum, at least 2)."""

    def __init__(
        self,
        site: str,
        roster: tuple[str, ...] | None = None,
        *,
        identity: SiteIdentity,
        threshold: float,
        neighbours: int | None,
        min_sites: int = 2,
    ) -> None:
        self.site = site
        self.roster = None if roster is None else frozenset(roster)
        self.identity = identity
        self.threshold = threshold
        self.neighbours = neighbours
        self.min_sites = max(2, min_sites)
        self._attempt: Attempt | None = None

    def prepare(self, attempt_id: str, exchange: Exchange) -> None:
        """Steps 1 and 2: agree keys with the round's sites and hand out shares.

        Raises :class:`AggregationError` naming every failed check when the key set or
        the share step's answer is not what honest parties would send: then this site
        sends no masked update in this attempt."""
        mask_keys, share_keys = masking.new_key_pair(), masking.new_key_pair()
        attempt = Attempt(attempt_id, mask_keys, share_keys, secrets.token_bytes(32))
        advert = signing.secagg_keys_message(
            attempt_id, self.site, share_keys.public, mask_keys.public
        )
        reply = loads(
            exchange(
                KEYS,
                dumps(
                    {
                        "attempt": attempt_id,
                        "c": share_keys.public.hex(),
                        "s": mask_keys.public.hex(),
                        "certificate": self.identity.certificate_pem,
                        "signature": self.identity.sign(advert).hex(),
                    }
                ),
            ),
            "key set",
        )
        attempt.key_set, certificates = check_key_set(
            attempt_id,
            reply,
            attempt,
            site=self.site,
            roster=self.roster,
            identity=self.identity,
            threshold=self.threshold,
            neighbours=self.neighbours,
            min_sites=self.min_sites,
        )
        members = sorted(attempt.key_set)
        graph = masking.neighbours(members, self.neighbours)
        attempt.neighbours = graph[self.site]
        threshold = threshold_of(len(attempt.neighbours), self.threshold)
        digest = key_set_digest(attempt_id, attempt.key_set)
        key_set_message = signing.secagg_key_set_message(attempt_id, digest)
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
                share_keys.private, attempt.key_set[other]["c"], context=share_context(attempt_id)
            )
            plain = dumps({"x": x, "b": b_shares[x].hex(), "s": s_shares[x].hex()})
            blob = masking.encrypt(
                key, plain, associated=share_associated(attempt_id, self.site, other)
            )
            outgoing[other] = blob.hex()
        signed = self.identity.sign(key_set_message).hex()
        reply = loads(exchange(SHARES, dumps({"to": outgoing, "key_set": signed})), "shares")
        attempt.completed = check_completed(
            reply,
            attempt,
            certificates,
            key_set_message,
            threshold,
            site=self.site,
            min_sites=self.min_sites,
        )
        inbox = reply.get("from")
        for sender, blob in sorted(inbox.items() if isinstance(inbox, dict) else ()):
            if sender not in attempt.neighbours:
                continue
            key = masking.agree(
                share_keys.private, attempt.key_set[sender]["c"], context=share_context(attempt_id)
            )
            try:
                share = loads(
                    masking.decrypt(
                        key,
                        bytes.fromhex(blob),
                        associated=share_associated(attempt_id, sender, self.site),
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
        attempt_id: str,
        update: Mapping[str, np.ndarray],
        *,
        weight: float,
        clip_range: float,
        frac: int,
        bits: int,
    ) -> Weights:
        """Step 3: ``update`` encoded and masked, tensor by tensor (unsigned ints)."""
        attempt = self._current(attempt_id)
        pair_keys = [
            (
                masking.pair_sign(self.site, other),
                masking.agree(
                    attempt.mask_keys.private,
                    attempt.key_set[other]["s"],
                    context=mask_context(attempt_id),
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

    def unmask(self, attempt_id: str, exchange: Exchange) -> None:
        """Step 4: reveal the shares the aggregator may have, and no others."""
        attempt = self._current(attempt_id)
        reply = loads(exchange(UNMASK, dumps({"attempt": attempt_id})), "survivor list")
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
        reveal: dict[str, Any] = {"attempt": attempt_id, "b": {}, "s": {}}
        for sender, (x, b_share, s_share) in sorted(attempt.held.items()):
            if sender in survivors:
                reveal["b"][sender] = f"{x}:{b_share.hex()}"
            elif sender in dropped:
                reveal["s"][sender] = f"{x}:{s_share.hex()}"
        exchange(REVEAL, dumps(reveal))
        self._attempt = None

    def _current(self, attempt_id: str) -> Attempt:
        attempt = self._attempt
        if attempt is None or attempt.attempt_id != attempt_id:
            raise AggregationError(
                f"secure aggregation: no key exchange for task {attempt_id} at this site"
            )
        return attempt
