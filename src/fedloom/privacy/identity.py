"""Who a site is in secure aggregation: the key it signs its key advertisements with,
its certificate, and the CA every other site's certificate must chain to.

A real site is its mutual-TLS identity: the private key it made itself and the
certificate the federation's CA signed (:meth:`SiteIdentity.from_credentials`). A peer's
certificate is trusted when the same CA issued it, it is valid now, it is a client
certificate, and its common name is the site it speaks for (:func:`peer_certificate`).

In simulation there are no certificates. :class:`SimulatedAuthority` makes a CA in
memory and issues each simulated site a key and a certificate from it, so the very same
signatures and checks run (and travel through the wire round trip). It protects
nothing there: the simulated sites, their keys and the aggregator share one process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.core.errors import CertificateError
from fedloom.pki.authority import sign_leaf
from fedloom.pki.common import (
    CLOCK_SKEW,
    cert_to_pem,
    check_peer_chain,
    common_name,
    load_cert,
    load_private_key,
    new_key,
    now,
    public_key_der,
)
from fedloom.pki.credentials import Credentials
from fedloom.privacy import signing


@dataclass(frozen=True)
class SiteIdentity:
    """A site's signing key, its certificate (common name: the site) and the CA it
    trusts. Never printed with its key."""

    site: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca: x509.Certificate

    def __repr__(self) -> str:
        return f"SiteIdentity(site={self.site!r}, key=<private>, certificate=…, ca=…)"

    @property
    def certificate_pem(self) -> str:
        return cert_to_pem(self.certificate).decode("ascii")

    def sign(self, message: bytes) -> bytes:
        return signing.sign(self.key, message)

    @classmethod
    def from_credentials(cls, site: str, credentials: Credentials) -> SiteIdentity:
        """The identity in a site's mutual-TLS credentials, once checked: the certificate
        names ``site`` and holds the public half of the key."""
        key = load_private_key(credentials.key_pem, "site's private key")
        certificate = load_cert(credentials.cert_pem, "site's certificate")
        ca = load_cert(credentials.ca_pem, "federation's CA certificate")
        name = common_name(certificate.subject, "site's certificate")
        if name != site:
            raise CertificateError(
                f"this site's certificate names {name!r}, not {site!r}",
                hint="run the collaborator with --name set to the certificate's name",
            )
        if public_key_der(certificate) != public_key_der(key):
            raise CertificateError(
                "this site's certificate does not hold the public half of its private key",
                hint="restore site.key and site.crt from the same `fedloom pki request`",
            )
        return cls(site, key, certificate, ca)


def peer_certificate(site: str, pem: str, ca: x509.Certificate) -> x509.Certificate:
    """The certificate ``pem`` that speaks for ``site``: issued by ``ca``, valid now, a
    client certificate, with ``site`` as its common name. :class:`CertificateError`
    saying which of these failed otherwise. A certificate that passed is remembered
    (its validity period is checked again at each use)."""
    key = hashlib.sha256(b"\0".join((site.encode(), pem.encode(), ca.tbs_certificate_bytes)))
    with _LOCK:
        found = _CHECKED.get(key.digest())
    if found is not None and found.not_valid_before_utc <= now() < found.not_valid_after_utc:
        return found
    cert = _check_peer(site, pem, ca)
    with _LOCK:
        if len(_CHECKED) >= _REMEMBERED:
            _CHECKED.clear()
        _CHECKED[key.digest()] = cert
    return cert


def verified(certificate: x509.Certificate, message: bytes, signature: bytes) -> bool:
    """:func:`fedloom.privacy.signing.verify`, remembering the signatures that verified:
    in simulation every site checks the same signatures, which then costs one check
    each instead of one per site."""
    key = hashlib.sha256()
    for part in (certificate.public_bytes(Encoding.DER), message, signature):
        key.update(len(part).to_bytes(8, "big") + part)
    with _LOCK:
        if key.digest() in _VERIFIED:
            return True
    if not signing.verify(certificate, message, signature):
        return False
    with _LOCK:
        if len(_VERIFIED) >= _REMEMBERED:
            _VERIFIED.clear()
        _VERIFIED.add(key.digest())
    return True


_REMEMBERED = 65_536
_LOCK = threading.Lock()
_CHECKED: dict[bytes, x509.Certificate] = {}
_VERIFIED: set[bytes] = set()


def _check_peer(site: str, pem: str, ca: x509.Certificate) -> x509.Certificate:
    cert = signing.certificate_from_pem(pem.encode("ascii", errors="replace"), ca)
    check_peer_chain(pem.encode("ascii", errors="replace"), ca)  # not a CA itself
    name = common_name(cert.subject, "certificate")
    if name != site:
        raise CertificateError(
            f"the certificate names {name!r}, not {site!r}",
            hint="a site signs only with its own certificate",
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise CertificateError(
            f"the certificate for {name!r} is not a site's (client) certificate",
            hint="a site signs only with the certificate `fedloom pki sign` made for it",
        )
    return cert


class SimulatedAuthority:
    """An in-memory CA for simulated sites: :meth:`identity` issues (once per name) a key
    and a certificate. Nothing is written to disk; nothing outlives the process."""

    def __init__(self, name: str = "fedloom simulation") -> None:
        self._key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name[:61]} CA")])
        stamp = now()
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(stamp - CLOCK_SKEW)
            .not_valid_after(stamp + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._issued: dict[str, SiteIdentity] = {}
        self._lock = threading.Lock()

    def identity(self, site: str) -> SiteIdentity:
        with self._lock:
            found = self._issued.get(site)
            if found is None:
                key = new_key()
                cert = sign_leaf(
                    self._key,
                    self.ca,
                    subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]),
                    public_key=key.public_key(),
                    days=30,
                    usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                )
                found = self._issued[site] = SiteIdentity(site, key, cert, self.ca)
            return found


_SIMULATION: SimulatedAuthority | None = None
_SIMULATION_LOCK = threading.Lock()


def simulated_identity(site: str) -> SiteIdentity:
    """``site``'s identity from this process's simulated CA (made on first use): what a
    site without credentials (simulation, tests) signs with."""
    global _SIMULATION
    with _SIMULATION_LOCK:
        if _SIMULATION is None:
            _SIMULATION = SimulatedAuthority()
        authority = _SIMULATION
    return authority.identity(site)
