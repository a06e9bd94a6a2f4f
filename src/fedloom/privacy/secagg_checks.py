"""The site's checks of the aggregator's answers in secure aggregation, as plain
functions: the key set it relays (step 1) and the sites it says completed the share step
(step 2). See :mod:`~fedloom.privacy.secagg` for the protocol and the trust it assumes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from cryptography import x509

from fedloom.core.errors import AggregationError, CertificateError
from fedloom.privacy import masking, signing
from fedloom.privacy.identity import SiteIdentity, peer_certificate, verified


@dataclass
class Attempt:
    """What a site holds of one attempt at a round: its keys, its seed ``b_i``, the
    checked key set, its neighbours, the mask set and the shares it was sent."""

    attempt_id: str
    mask_keys: masking.KeyPair
    share_keys: masking.KeyPair
    seed: bytes  # b_i
    key_set: dict[str, dict[str, bytes]] = field(default_factory=dict)  # site -> {"c","s"}
    neighbours: tuple[str, ...] = ()
    completed: tuple[str, ...] = ()  # sites that sent their shares (the mask set)
    held: dict[str, tuple[int, bytes, bytes]] = field(default_factory=dict)  # from -> (x, b, s)


def refuse(problems: list[str], *, step: str = "key set") -> NoReturn:
    raise AggregationError(
        f"secure aggregation: the {step} fails its checks, so this site sends no masked "
        "update this round: " + "; ".join(problems)
    )


def check_key_set(
    attempt_id: str,
    reply: Mapping[str, Any],
    attempt: Attempt,
    *,
    site: str,
    roster: frozenset[str] | None,
    identity: SiteIdentity,
    threshold: float,
    neighbours: int | None,
    min_sites: int,
) -> tuple[dict[str, dict[str, bytes]], dict[str, x509.Certificate]]:
    """The key set in the aggregator's reply to step 1, and the certificate of each
    other site in it, once every check passed; else :class:`AggregationError`
    naming each one that failed."""
    problems: list[str] = []
    if reply.get("threshold") != threshold or reply.get("neighbours") != neighbours:
        problems.append(
            f"the aggregator asks for threshold {reply.get('threshold')!r} and "
            f"neighbours {reply.get('neighbours')!r}, this site's plan says "
            f"{threshold!r} and {neighbours!r}"
        )
    listed = reply.get("sites")
    if not isinstance(listed, list):
        refuse(["the key set is not a list of signed key advertisements", *problems])
    key_set: dict[str, dict[str, bytes]] = {}
    certificates: dict[str, x509.Certificate] = {}
    seen: set[str] = set()
    for entry in listed:
        name = entry.get("site") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            problems.append("an entry of the key set names no site")
            continue
        if name in seen:
            problems.append(f"{name!r} appears more than once")
            key_set.pop(name, None)
            continue
        seen.add(name)
        if roster is not None and name not in roster:
            problems.append(f"{name!r} is not one of the plan's sites")
            continue
        try:
            c, s = bytes.fromhex(entry["c"]), bytes.fromhex(entry["s"])
            signature = bytes.fromhex(entry["signature"])
            pem = entry["certificate"]
            message = signing.secagg_keys_message(attempt_id, name, c, s)
            if not isinstance(pem, str):
                raise TypeError("the certificate is not PEM text")
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"the entry of {name!r} is malformed ({err})")
            continue
        if name == site:
            if (c, s) != (attempt.share_keys.public, attempt.mask_keys.public):
                problems.append(f"this site's own keys ({name!r}) are not as it sent them")
            else:
                key_set[name] = {"c": c, "s": s}
            continue
        try:
            cert = peer_certificate(name, pem, identity.ca)
        except CertificateError as err:
            problems.append(f"the certificate given for {name!r} is refused: {err.message}")
            continue
        if not verified(cert, message, signature):
            problems.append(
                f"the keys given for {name!r} do not carry its signature (replaced or forged)"
            )
            continue
        key_set[name] = {"c": c, "s": s}
        certificates[name] = cert
    if site not in seen:
        problems.append(f"this site ({site!r}) is left out")
    if not problems and len(key_set) < min_sites:
        problems.append(
            f"it holds {len(key_set)} site(s), fewer than the {min_sites} this "
            "site's plan needs for a round"
        )
    if problems:
        refuse(problems)
    return key_set, certificates


def check_completed(
    reply: Mapping[str, Any],
    attempt: Attempt,
    certificates: Mapping[str, x509.Certificate],
    key_set_message: bytes,
    threshold: int,
    *,
    site: str,
    min_sites: int,
) -> tuple[str, ...]:
    """The sites that completed step 2 (the mask set), once the consistency check
    passed: each of them signed the very key set this site saw. Else
    :class:`AggregationError` naming each site that did not."""
    listed, signatures = reply.get("sites"), reply.get("key_set")
    if not isinstance(listed, list) or not isinstance(signatures, dict):
        refuse(["the share step's answer lacks the sites' signatures over the key set"])
    problems: list[str] = []
    completed = sorted({str(name) for name in listed})
    if len(completed) != len(listed):
        problems.append("the sites that sent their shares are listed with repeats")
    outside = [name for name in completed if name not in attempt.key_set]
    if outside:
        problems.append(f"sites outside the key set are said to have sent shares: {outside}")
    if site not in completed:
        problems.append("this site is not listed among those that sent their shares")
    for name in completed:
        if name == site or name not in certificates:
            continue
        signature = signatures.get(name)
        try:
            valid = isinstance(signature, str) and verified(
                certificates[name], key_set_message, bytes.fromhex(signature)
            )
        except ValueError:
            valid = False
        if not valid:
            problems.append(
                f"{name!r} did not sign the key set this site saw (the aggregator "
                "showed it another, or forged its signature)"
            )
    masking_with = [n for n in attempt.neighbours if n in completed]
    if not problems and attempt.neighbours and len(masking_with) < threshold:
        problems.append(
            f"only {len(masking_with)} of this site's {len(attempt.neighbours)} "
            f"neighbours sent their shares, fewer than the {threshold} that must "
            "reveal them to unmask the sum"
        )
    if not problems and len(completed) < min_sites:
        problems.append(
            f"only {len(completed)} site(s) sent their shares, fewer than the "
            f"{min_sites} this site's plan needs for a round"
        )
    if problems:
        refuse(problems, step="share step")
    return tuple(completed)
