"""Secure aggregation, the aggregator's side of one attempt at a round.

The aggregator relays the sites' signed keys (refusing a site whose keys its own
certificate did not sign), their encrypted shares and their signatures over the key set
they saw, folds the masked updates into a sum
modulo ``2**bits`` (:class:`~fedloom.accumulate.masked.MaskedSumAccumulator`) and, once
the uploads are closed, asks the survivors for the shares that remove the masks:
``b_j`` of every site whose masked update it holds, ``s_d`` of every site that dropped
after the key exchange. It never asks for both of one site, so it learns the sum and
nothing else, as long as it follows the protocol (see :mod:`~fedloom.privacy.secagg` for
the site's side, its checks, and the trust this assumes).

Waiting: each of the two key steps is a barrier that opens when every site of the round
still in it has spoken, or ``key_seconds`` after the step began; sites that missed it
are out of this attempt (their masks are not in anyone's update). The handlers block on
the aggregator's own condition, so a site dropped by the round wakes them.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography import x509

from fedloom.accumulate.masked import MaskedSumAccumulator
from fedloom.core.clock import Clock
from fedloom.core.errors import AggregationError, CertificateError, UpdateRejected
from fedloom.core.sanitize import MAX_TEXT_CHARS, printable
from fedloom.core.weights import TensorSpec
from fedloom.pki.common import common_name, load_cert
from fedloom.privacy import masking, shamir, signing
from fedloom.privacy.identity import peer_certificate
from fedloom.privacy.quantize import decode, sum_problem, unsigned
from fedloom.privacy.secagg import (
    KEYS,
    REVEAL,
    SHARES,
    UNMASK,
    dumps,
    loads,
    mask_context,
    stream_offsets,
    threshold_of,
)


class Step(enum.Enum):
    KEYS = 1
    SHARES = 2
    UPLOADS = 3
    UNMASK = 4
    DONE = 5


@dataclass(frozen=True)
class SecAggParameters:
    bits: int
    frac: int
    threshold: float  # fraction of a site's neighbours
    neighbours: int | None
    key_seconds: float
    clip_range: float  # what one coordinate of one site's update may reach, unweighted


class SecAggRound:
    """One attempt at a round under secure aggregation, at the aggregator."""

    def __init__(
        self,
        *,
        task_id: str,
        round: int,
        selected: tuple[str, ...],
        specs: tuple[TensorSpec, ...],
        params: SecAggParameters,
        clock: Clock,
        cond: threading.Condition,
        in_round: Callable[[], Iterable[str]],
        drop: Callable[[str, str], None],  # settle a site as failed (caller holds cond)
        spool_dir: Path | None = None,
        site_ca: x509.Certificate | None = None,  # sites' certificates must chain to it
    ) -> None:
        self.task_id = task_id
        self.round = round
        self.selected = selected
        self.params = params
        self.specs = tuple(TensorSpec(s.name, unsigned(params.bits).name, s.shape) for s in specs)
        self._clock = clock
        self._cond = cond
        self._in_round = in_round  # the round's sites not yet settled (caller holds cond)
        self._drop = drop
        self._site_ca = site_ca
        self.step = Step.KEYS
        self._step_began = clock.now()
        self._keys: dict[str, dict[str, str]] = {}
        self._signed: dict[str, dict[str, str]] = {}  # site -> its certificate and signature
        self._key_set_signatures: dict[str, str] = {}  # site -> its signature over the key set
        self._outbox: dict[str, dict[str, str]] = {}  # sender -> recipient -> blob
        self._graph: dict[str, tuple[str, ...]] = {}
        self._survivors: tuple[str, ...] = ()
        self._dropped: tuple[str, ...] = ()
        self._b: dict[str, dict[int, bytes]] = {}  # owner -> x -> share of b
        self._s: dict[str, dict[int, bytes]] = {}
        self._revealed: set[str] = set()
        self.failure: str | None = None
        self.accumulator = MaskedSumAccumulator(self.specs, admit=self._admit, spool_dir=spool_dir)

    def describe(self) -> dict[str, object]:
        """Where the secure aggregation stands, for ``fedloom status`` (the caller holds
        the condition)."""
        return {
            "step": self.step.name.lower(),
            "keys": len(self._keys),
            "shares": len(self._outbox),
            "survivors": len(self._survivors),
            "dropped": len(self._dropped),
            "revealed": len(self._revealed),
            "failure": self.failure,
        }

    # ---------------------------------------------------------------- handlers

    def handle(self, site: str, phase: str, payload: bytes) -> bytes:
        if phase == KEYS:
            return self._on_keys(site, loads(payload, "public keys"))
        if phase == SHARES:
            return self._on_shares(site, loads(payload, "shares"))
        if phase == UNMASK:
            return self._on_unmask(site, loads(payload, "unmask request"))
        if phase == REVEAL:
            return self._on_reveal(site, loads(payload, "revealed shares"))
        raise UpdateRejected(
            f"secure aggregation has no phase {printable(repr(phase), MAX_TEXT_CHARS)}"
        )

    def _on_keys(self, site: str, keys: dict[str, object]) -> bytes:
        self._check_task(keys)
        c, s = _public_key(keys.get("c")), _public_key(keys.get("s"))
        signed = _signed_advertisement(self.task_id, site, c, s, keys, self._site_ca)
        with self._cond:
            self._expect(site, Step.KEYS, "its public keys")
            if site in self._keys:
                raise UpdateRejected(
                    f"secure aggregation: {site!r} already sent its keys for task "
                    f"{self.task_id} (a second process of the site?); it sits this round out"
                )
            self._keys[site] = {"c": c, "s": s}
            self._signed[site] = signed
            self._cond.notify_all()
            self._barrier(Step.KEYS, lambda: set(self._keys))
            if site not in self._keys or self.step is not Step.SHARES:
                raise UpdateRejected(self._why_out(site, "key exchange"))
            return dumps(
                {
                    "sites": [
                        {"site": name, **self._keys[name], **self._signed[name]}
                        for name in sorted(self._keys)
                    ],
                    "neighbours": self.params.neighbours,
                    "threshold": self.params.threshold,
                }
            )

    def _on_shares(self, site: str, shares: dict[str, object]) -> bytes:
        outgoing, signature = shares.get("to"), shares.get("key_set")
        if not isinstance(outgoing, dict):
            raise UpdateRejected("secure aggregation: shares come as {'to': {site: blob}}")
        if not isinstance(signature, str) or not signature or not _is_hex(signature):
            raise UpdateRejected(
                "secure aggregation: the shares must come with the site's signature over "
                "the key set it saw ('key_set', hex): is the site's fedloom older?"
            )
        if len(signature) > _MAX_SIGNATURE_HEX:  # it is sent on to every other site
            raise UpdateRejected(
                f"secure aggregation: the key-set signature is {len(signature) // 2} bytes, "
                f"more than any certificate key signs ({_MAX_SIGNATURE_HEX // 2})"
            )
        with self._cond:
            self._expect(site, Step.SHARES, "its shares")
            if site in self._outbox:
                raise UpdateRejected(f"secure aggregation: {site!r} already sent its shares")
            expected = set(self._graph.get(site, ()))
            if set(outgoing) != expected:
                raise UpdateRejected(
                    f"secure aggregation: {site!r} must send one share to each of its "
                    f"neighbours {sorted(expected)}, sent {sorted(outgoing)}"
                )
            for blob in outgoing.values():
                if not isinstance(blob, str) or not _is_hex(blob):
                    raise UpdateRejected("secure aggregation: each share must be hex text")
            self._outbox[site] = {k: str(v) for k, v in outgoing.items()}
            self._key_set_signatures[site] = signature
            self._cond.notify_all()
            self._barrier(Step.SHARES, lambda: set(self._outbox))
            if site not in self._outbox or self.step is not Step.UPLOADS:
                raise UpdateRejected(self._why_out(site, "share exchange"))
            inbox = {
                sender: box[site] for sender, box in sorted(self._outbox.items()) if site in box
            }
            return dumps(
                {
                    "sites": sorted(self._outbox),
                    "from": inbox,
                    "key_set": {name: self._key_set_signatures[name] for name in self._outbox},
                }
            )

    def _on_unmask(self, site: str, request: dict[str, object]) -> bytes:
        with self._cond:
            self._check_task(request)
            if site not in self._outbox:
                raise UpdateRejected(
                    f"secure aggregation: {site!r} holds no shares of task {self.task_id}"
                )
            while self.step.value < Step.UNMASK.value and self.failure is None:
                self._clock.wait(self._cond, None)
            if self.failure is not None:
                return dumps({"abandoned": self.failure})
            if site not in self._survivors:
                raise UpdateRejected(f"secure aggregation: {site!r} is not among the survivors")
            return dumps({"survivors": list(self._survivors), "dropped": list(self._dropped)})

    def _on_reveal(self, site: str, shares: dict[str, object]) -> bytes:
        with self._cond:
            self._check_task(shares)
            if self.step is Step.DONE and site in self._survivors:
                return dumps({"done": True})  # enough shares came before this site's
            if self.step is not Step.UNMASK or site not in self._survivors:
                raise UpdateRejected("secure aggregation: no unmasking under way for this site")
            if site in self._revealed:
                raise UpdateRejected(f"secure aggregation: {site!r} already revealed its shares")
            x = sorted(self._keys).index(site) + 1  # the point of this site's shares
            parsed: list[tuple[dict[str, dict[int, bytes]], str, bytes]] = []
            for kind, store, allowed in (
                ("b", self._b, set(self._survivors)),
                ("s", self._s, set(self._dropped)),
            ):
                given = shares.get(kind) or {}
                if not isinstance(given, dict):
                    raise UpdateRejected(f"secure aggregation: {kind!r} must map sites to shares")
                for owner, text in given.items():
                    if owner not in allowed or site not in self._graph.get(owner, ()):
                        continue  # not asked for: ignored, never used
                    point, _, value = str(text).partition(":")
                    if point != str(x) or not _is_hex(value):
                        raise UpdateRejected(
                            f"secure aggregation: {site!r} revealed a malformed share of "
                            f"{owner!r} (its shares are at x={x})"
                        )
                    parsed.append((store, owner, bytes.fromhex(value)))
            for store, owner, share in parsed:  # all checked: nothing half-stored
                store.setdefault(owner, {})[x] = share
            self._revealed.add(site)
            self._cond.notify_all()
            return b"{}"

    # ------------------------------------------------------------- the round

    def _admit(self, site: str) -> None:
        with self._cond:
            if self.step is not Step.UPLOADS or site not in self._outbox:
                raise UpdateRejected(
                    f"secure aggregation: {site!r} has no masks agreed for task "
                    f"{self.task_id} (it missed the key exchange, or the uploads closed)"
                )

    def unmask(self, weights: Mapping[str, int], deadline: float) -> list[np.ndarray]:
        """The weighted sum of the survivors' updates, tensor by tensor (flat float64).

        ``weights`` maps each site whose masked update was folded to its weight. Waits
        for the survivors' shares until ``deadline``; raises :class:`AggregationError`
        when a mask cannot be removed."""
        with self._cond:
            survivors = tuple(sorted(weights))
            if len(survivors) < 2:
                raise self._fail(
                    f"only {len(survivors)} masked update(s) arrived; secure aggregation "
                    "reveals no sum of fewer than 2 sites"
                )
            self._survivors = survivors
            self._dropped = tuple(sorted(set(self._outbox) - set(survivors)))
            self.step = Step.UNMASK
            self._cond.notify_all()
            while not self._can_rebuild() and len(self._revealed) < len(survivors):
                if self._clock.now() >= deadline:
                    break
                self._clock.wait(self._cond, deadline)
            missing = self._missing()
            if missing:
                raise self._fail(
                    "could not unmask the sum: too few shares revealed for "
                    + "; ".join(missing)
                    + f" ({len(self._revealed)} of {len(survivors)} survivors answered)"
                )
            self.step = Step.DONE
            b_shares, s_shares = dict(self._b), dict(self._s)
        seeds = {j: self._rebuild(j, b_shares[j]) for j in survivors}
        dropped_keys = {
            d: masking.private_from_bytes(self._rebuild(d, s_shares[d])) for d in self._dropped
        }
        sums = self._remove_masks(self.accumulator.sums(), seeds, dropped_keys)
        self._check_range(sums, weights)
        return [decode(total, frac=self.params.frac, bits=self.params.bits) for total in sums]

    def _check_range(self, sums: list[np.ndarray], weights: Mapping[str, int]) -> None:
        """Refuse a sum no honest sites could have sent: a coordinate beyond what sites of
        these weights encode from the clip range, compared exactly, in integers (so no
        honest sum is refused). Masks that did not cancel (a site that changed its keys,
        garbage from a broken site) give uniformly random values, far out of range."""
        p = self.params
        problem = sum_problem(
            sums, weights.values(), clip_range=p.clip_range, frac=p.frac, bits=p.bits
        )
        if problem is not None:
            with self._cond:
                raise self._fail(
                    f"{problem}: the masks did not cancel, or a site sent values it could "
                    "not have encoded"
                )

    def abandon(self, reason: str) -> None:
        """The attempt ended without unmasking: release every waiting site."""
        with self._cond:
            if self.failure is None and self.step is not Step.DONE:
                self.failure = reason
            self._cond.notify_all()

    def _remove_masks(
        self,
        sums: list[np.ndarray],
        seeds: Mapping[str, bytes],
        dropped_keys: Mapping[str, object],
    ) -> list[np.ndarray]:
        bits = self.params.bits
        pair_keys = []
        for d, private in dropped_keys.items():
            for i in self._graph.get(d, ()):
                if i in seeds:  # a survivor that masked with d
                    key = masking.agree(
                        private,  # type: ignore[arg-type]
                        bytes.fromhex(self._keys[i]["s"]),
                        context=mask_context(self.task_id),
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

    # --------------------------------------------------------------- helpers

    def _check_task(self, request: dict[str, object]) -> None:
        if request.get("task") != self.task_id:
            raise UpdateRejected(
                "stale secure aggregation message: it is for task "
                f"{printable(str(request.get('task')), MAX_TEXT_CHARS)}, "
                f"round {self.round} is now task {self.task_id}"
            )

    def _expect(self, site: str, step: Step, what: str) -> None:
        if self.failure is not None:
            raise UpdateRejected(f"secure aggregation of task {self.task_id}: {self.failure}")
        if site not in self.selected:
            raise UpdateRejected(f"site {site!r} was not selected for task {self.task_id}")
        if self.step is not step:
            raise UpdateRejected(
                f"secure aggregation: {site!r} sent {what} too late: the step closed "
                "(the site takes part again in the next round)"
            )

    def _barrier(self, step: Step, spoke: Callable[[], set[str]]) -> None:
        """Wait (holding the condition) until every site still in the round has spoken
        at ``step`` or ``key_seconds`` passed; the first to see it closes the step."""
        deadline = self._step_began + self.params.key_seconds
        while self.step is step and self.failure is None:
            waiting = set(self._in_round()) - spoke()
            if step is Step.SHARES:
                waiting &= set(self._keys)
            if not waiting or self._clock.now() >= deadline:
                self._close_step(step, spoke(), waiting)
                break
            self._clock.wait(self._cond, deadline)

    def _close_step(self, step: Step, spoke: set[str], missed: set[str]) -> None:
        if step is Step.KEYS:
            self._graph = masking.neighbours(sorted(spoke), self.params.neighbours) if spoke else {}
            self.step = Step.SHARES
        else:
            self.step = Step.UPLOADS
        self._step_began = self._clock.now()
        self._cond.notify_all()
        if len(spoke) < 2:
            self.failure = f"only {len(spoke)} site(s) took part in the key exchange"
        reason = (
            f"missed secure aggregation's {'key' if step is Step.KEYS else 'share'} "
            f"exchange (key_seconds={self.params.key_seconds:g})"
        )
        for site in sorted(missed):
            self._drop(site, reason)  # under the condition, which the aggregator shares

    def _why_out(self, site: str, what: str) -> str:
        if self.failure is not None:
            return f"secure aggregation of task {self.task_id}: {self.failure}"
        return f"secure aggregation: {site!r} missed the {what} of task {self.task_id}"

    def _needs(self) -> list[tuple[str, dict[int, bytes], int]]:
        out = []
        for owner in (*self._survivors, *self._dropped):
            store = self._b if owner in self._survivors else self._s
            t = threshold_of(len(self._graph.get(owner, ())), self.params.threshold)
            out.append((owner, store.get(owner, {}), t))
        return out

    def _can_rebuild(self) -> bool:
        return all(len(shares) >= t for _, shares, t in self._needs())

    def _missing(self) -> list[str]:
        return [
            f"{owner} ({len(shares)} of {t})"
            for owner, shares, t in self._needs()
            if len(shares) < t
        ]

    def _rebuild(self, owner: str, shares: Mapping[int, bytes]) -> bytes:
        t = threshold_of(len(self._graph.get(owner, ())), self.params.threshold)
        return shamir.combine(sorted(shares.items()), threshold=t)

    def _fail(self, reason: str) -> AggregationError:
        self.failure = reason
        self._cond.notify_all()
        return AggregationError(f"secure aggregation of task {self.task_id}: {reason}")


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


_MAX_SIGNATURE_HEX = 2048
"""A signature's hex length at most: 1 KiB, beyond RSA-8192's 1,024 bytes and far beyond
the P-256 ECDSA signatures fedloom's keys make (at most 72 bytes)."""


def _signed_advertisement(
    task_id: str,
    site: str,
    c: str,
    s: str,
    keys: Mapping[str, object],
    ca: x509.Certificate | None,
) -> dict[str, str]:
    """The certificate and signature that come with ``site``'s keys, once they verify:
    the certificate names ``site`` (and is a site's, issued by ``ca``, when the
    aggregator knows the federation's CA) and its key signed the keys. Every site checks
    the same again; a site whose keys would fail there is refused here, alone, instead
    of making every other site refuse the round."""
    pem, signature = keys.get("certificate"), keys.get("signature")
    if not isinstance(pem, str) or not isinstance(signature, str) or not _is_hex(signature):
        raise UpdateRejected(
            "secure aggregation: the keys must come signed: a 'certificate' (PEM) and a "
            "'signature' (hex) by its key; is the site's fedloom older?"
        )
    try:
        cert = load_cert(pem.encode("ascii", errors="replace"), "certificate")
        name = common_name(cert.subject, "certificate")
        if ca is not None and name == site:
            cert = peer_certificate(site, pem, ca)
    except CertificateError as err:
        raise UpdateRejected(
            f"secure aggregation: the certificate {site!r} signed its keys with is refused: "
            f"{err.message}"
        ) from err
    message = signing.secagg_keys_message(task_id, site, bytes.fromhex(c), bytes.fromhex(s))
    if name != site or not signing.verify(cert, message, bytes.fromhex(signature)):
        raise UpdateRejected(
            f"secure aggregation: the keys {site!r} sent are not signed by its own "
            f"certificate (the certificate names {name!r}); it sits this round out"
        )
    return {"certificate": pem, "signature": signature}


def _public_key(value: object) -> str:
    """``value`` if it is a usable X25519 public key in hex (32 bytes, not a point that
    makes every agreement zero), else :class:`UpdateRejected`."""
    if not isinstance(value, str) or len(value) != 64 or not _is_hex(value):
        raise UpdateRejected("secure aggregation: public keys must be 32 bytes, in hex")
    try:
        masking.agree(masking.new_key_pair().private, bytes.fromhex(value), context=b"check")
    except AggregationError as err:
        raise UpdateRejected(f"secure aggregation: unusable public key: {err.message}") from err
    return value
