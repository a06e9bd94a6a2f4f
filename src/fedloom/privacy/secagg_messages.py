"""The aggregator's checks of what sites send in secure aggregation, as plain functions:
signed key advertisements, the share step's message, revealed shares and the task they
are for (see :mod:`~fedloom.privacy.secagg_server`)."""

from __future__ import annotations

from collections.abc import Mapping

from cryptography import x509

from fedloom.core.errors import AggregationError, CertificateError, UpdateRejected
from fedloom.core.sanitize import MAX_TEXT_CHARS, printable
from fedloom.pki.common import common_name, load_cert
from fedloom.privacy import masking, signing
from fedloom.privacy.identity import peer_certificate


def check_attempt(request: Mapping[str, object], attempt_id: str, round: int) -> None:
    if request.get("attempt") != attempt_id:
        raise UpdateRejected(
            "stale secure aggregation message: it is for attempt "
            f"{printable(str(request.get('attempt')), MAX_TEXT_CHARS)}, "
            f"round {round} is now attempt {attempt_id}"
        )


def shares_message(shares: Mapping[str, object]) -> tuple[dict[str, object], str]:
    """The outgoing shares and the key-set signature of a share step's message, once
    their shapes are right; else :class:`UpdateRejected`."""
    outgoing, signature = shares.get("to"), shares.get("key_set")
    if not isinstance(outgoing, dict):
        raise UpdateRejected("secure aggregation: shares come as {'to': {site: blob}}")
    if not isinstance(signature, str) or not signature or not is_hex(signature):
        raise UpdateRejected(
            "secure aggregation: the shares must come with the site's signature over "
            "the key set it saw ('key_set', hex): is the site's fedloom older?"
        )
    if len(signature) > MAX_SIGNATURE_HEX:  # it is sent on to every other site
        raise UpdateRejected(
            f"secure aggregation: the key-set signature is {len(signature) // 2} bytes, "
            f"more than any certificate key signs ({MAX_SIGNATURE_HEX // 2})"
        )
    return outgoing, signature


def addressed_shares(
    site: str, outgoing: Mapping[str, object], neighbours: tuple[str, ...]
) -> dict[str, str]:
    """``site``'s outgoing shares, once there is one in hex for each of its
    ``neighbours`` and no other; else :class:`UpdateRejected`."""
    expected = set(neighbours)
    if set(outgoing) != expected:
        raise UpdateRejected(
            f"secure aggregation: {site!r} must send one share to each of its "
            f"neighbours {sorted(expected)}, sent {sorted(outgoing)}"
        )
    for blob in outgoing.values():
        if not isinstance(blob, str) or not is_hex(blob):
            raise UpdateRejected("secure aggregation: each share must be hex text")
    return {k: str(v) for k, v in outgoing.items()}


def revealed_shares(
    site: str,
    x: int,
    shares: Mapping[str, object],
    allowed: Mapping[str, set[str]],
    graph: Mapping[str, tuple[str, ...]],
) -> list[tuple[str, str, bytes]]:
    """``(kind, owner, share)`` for each share ``site`` revealed that was asked for:
    ``allowed`` maps each kind (``"b"``, ``"s"``) to the owners whose shares of it may
    be revealed. Shares not asked for are ignored; a malformed one is
    :class:`UpdateRejected`."""
    parsed: list[tuple[str, str, bytes]] = []
    for kind, owners in allowed.items():
        given = shares.get(kind) or {}
        if not isinstance(given, dict):
            raise UpdateRejected(f"secure aggregation: {kind!r} must map sites to shares")
        for owner, text in given.items():
            if owner not in owners or site not in graph.get(owner, ()):
                continue  # not asked for: ignored, never used
            point, _, value = str(text).partition(":")
            if point != str(x) or not is_hex(value):
                raise UpdateRejected(
                    f"secure aggregation: {site!r} revealed a malformed share of "
                    f"{owner!r} (its shares are at x={x})"
                )
            parsed.append((kind, owner, bytes.fromhex(value)))
    return parsed


def is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


MAX_SIGNATURE_HEX = 2048
"""A signature's hex length at most: 1 KiB, beyond RSA-8192's 1,024 bytes and far beyond
the P-256 ECDSA signatures fedloom's keys make (at most 72 bytes)."""


def signed_advertisement(
    attempt_id: str,
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
    if not isinstance(pem, str) or not isinstance(signature, str) or not is_hex(signature):
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
    message = signing.secagg_keys_message(attempt_id, site, bytes.fromhex(c), bytes.fromhex(s))
    if name != site or not signing.verify(cert, message, bytes.fromhex(signature)):
        raise UpdateRejected(
            f"secure aggregation: the keys {site!r} sent are not signed by its own "
            f"certificate (the certificate names {name!r}); it sits this round out"
        )
    return {"certificate": pem, "signature": signature}


def public_key(value: object) -> str:
    """``value`` if it is a usable X25519 public key in hex (32 bytes, not a point that
    makes every agreement zero), else :class:`UpdateRejected`."""
    if not isinstance(value, str) or len(value) != 64 or not is_hex(value):
        raise UpdateRejected("secure aggregation: public keys must be 32 bytes, in hex")
    try:
        masking.agree(masking.new_key_pair().private, bytes.fromhex(value), context=b"check")
    except AggregationError as err:
        raise UpdateRejected(f"secure aggregation: unusable public key: {err.message}") from err
    return value
