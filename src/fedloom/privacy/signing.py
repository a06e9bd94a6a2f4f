"""Signatures with the federation's EC P-256 keys: the aggregator's receipts for a
site's audit records, its signature on each global model it publishes, and the sites'
signatures on their secure-aggregation keys and on the key set they saw.

Pure functions over keys and bytes. Every signed message starts with its own
domain tag, so a signature made for one purpose never verifies for another.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedloom.pki.common import check_issued_and_current, load_cert

RECEIPT_TAG = b"fedloom-receipt-v1\0"
MODEL_TAG = b"fedloom-model-v1\0"
SECAGG_KEYS_TAG = b"fedloom-secagg-keys-v1\0"
SECAGG_KEY_SET_TAG = b"fedloom-secagg-key-set-v1\0"
_PUBLIC_KEY_SIZE = 32
_DIGEST_SIZE = 32


def _field(value: str, what: str) -> bytes:
    if "\0" in value:
        raise ValueError(f"the {what} {value!r} contains a NUL character")
    return value.encode("utf-8")


def receipt_message(site: str, attempt_id: str, record_hash: str) -> bytes:
    """What the aggregator signs to acknowledge a site's audit record:
    ``fedloom-receipt-v1 NUL site NUL attempt_id NUL record_hash`` (UTF-8)."""
    return b"\0".join(
        (
            RECEIPT_TAG + _field(site, "site name"),
            _field(attempt_id, "attempt id"),
            _field(record_hash, "record hash"),
        )
    )


def model_message(attempt_id: str, round: int, specs_digest: bytes, content_digest: bytes) -> bytes:
    """What the aggregator signs when it publishes a global model:
    ``fedloom-model-v1 NUL attempt_id NUL``, the round as 8 bytes big-endian, then the
    32-byte sha256 digests of the tensor specs and of the tensor bytes."""
    if round < 0:
        raise ValueError(f"round must be >= 0, not {round}")
    for digest, what in ((specs_digest, "specs"), (content_digest, "content")):
        if len(digest) != _DIGEST_SIZE:
            raise ValueError(f"the {what} digest must be {_DIGEST_SIZE} bytes, not {len(digest)}")
    return (
        MODEL_TAG
        + _field(attempt_id, "attempt id")
        + b"\0"
        + round.to_bytes(8, "big")
        + bytes(specs_digest)
        + bytes(content_digest)
    )


def secagg_keys_message(attempt_id: str, site: str, share_key: bytes, mask_key: bytes) -> bytes:
    """What a site signs when it advertises its secure-aggregation keys for one attempt:
    ``fedloom-secagg-keys-v1 NUL attempt_id NUL site NUL``, then its two 32-byte X25519
    public keys (the one shares are encrypted to, then the one masks are agreed with)."""
    for key, what in ((share_key, "share"), (mask_key, "mask")):
        if len(key) != _PUBLIC_KEY_SIZE:
            raise ValueError(f"the {what} public key must be {_PUBLIC_KEY_SIZE} bytes")
    return (
        SECAGG_KEYS_TAG
        + _field(attempt_id, "attempt id")
        + b"\0"
        + _field(site, "site name")
        + b"\0"
        + bytes(share_key)
        + bytes(mask_key)
    )


def secagg_key_set_message(attempt_id: str, key_set_digest: bytes) -> bytes:
    """What a site signs to say which key set it saw in one attempt:
    ``fedloom-secagg-key-set-v1 NUL attempt_id NUL``, then the 32-byte digest of the key set
    (:func:`fedloom.privacy.secagg.key_set_digest`)."""
    if len(key_set_digest) != _DIGEST_SIZE:
        raise ValueError(f"the key set digest must be {_DIGEST_SIZE} bytes")
    return SECAGG_KEY_SET_TAG + _field(attempt_id, "attempt id") + b"\0" + bytes(key_set_digest)


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA with SHA-256 over ``message``; the signature is DER-encoded."""
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify(certificate: x509.Certificate, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``message`` was made with the key ``certificate``
    holds. False for any bad signature or a key that is not EC; never raises for one."""
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def certificate_from_pem(pem: bytes, ca: x509.Certificate) -> x509.Certificate:
    """The certificate in ``pem``, once checked: issued by ``ca`` and valid now."""
    cert = load_cert(pem, "certificate")
    name = cert.subject.rfc4514_string()
    fingerprint = "SHA256:" + cert.fingerprint(hashes.SHA256()).hex(":").upper()
    check_issued_and_current(
        cert,
        ca,
        not_issued=f"the certificate for {name!r} ({fingerprint}) was not issued by the "
        "federation's CA",
        not_issued_hint="use the certificate the federation's CA signed; compare its "
        "fingerprint with the CA's over another channel",
        not_current_hint="check this machine's clock, or ask the CA for a current certificate",
    )
    return cert
