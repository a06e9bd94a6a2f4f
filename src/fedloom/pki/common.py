"""What the CA side and the site side share: file names, names, fingerprints, PEM
loading and atomic file writes.

Every problem with a key, certificate, signing request or revocation list becomes a
:class:`~fedloom.core.errors.CertificateError` that says what was wrong and what to do.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedloom.core import files
from fedloom.core.errors import CertificateError
from fedloom.core.site_name import site_name_problem

PKI_DIR = "pki"
"""The CA's folder in a workspace (WORKSPACE/pki)."""
SITES_DIR = "sites"
"""Where a workspace keeps its sites' state folders by default (WORKSPACE/sites/NAME)."""


def pki_dir_of(workspace: Path) -> Path:
    return Path(workspace) / PKI_DIR


def site_state_dir(workspace: Path, name: str) -> Path:
    """A site's default state folder: its key, certificates, log (WORKSPACE/sites/NAME).
    Refuses a name that breaks the site-name rule, so the folder stays in ``sites/``."""
    return Path(workspace) / SITES_DIR / check_name(name)


# The CA's folder
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CRL_FILE = "crl.pem"
ISSUED_DIR = "issued"
SUPERSEDED_DIR = "superseded"  # under issued/: certificates replaced by a re-issue
SERVER_KEY = "aggregator.key"
SERVER_CERT = "aggregator.crt"
SERVER_NAME = "aggregator"

# A site's state folder
SITE_KEY = "site.key"


def csr_file(name: str) -> str:
    """The name of site ``name``'s signing request: ``NAME.csr``, so that the CA, who
    receives one from every site, never gets two files of the same name."""
    return f"{name}.csr"


SITE_CERT = "site.crt"
SITE_CA = "ca.crt"

CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates are valid from this long before they were made, for clocks that lag."""


@dataclass(frozen=True)
class CertInfo:
    """What a person checks about a certificate: whose it is, and which one."""

    name: str
    fingerprint: str
    serial: int
    not_after: dt.datetime


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_name(name: str) -> str:
    """``name`` if it can name a site (and a file): the rule of :mod:`fedloom.core.site_name`."""
    problem = site_name_problem(name)
    if problem is not None:
        raise CertificateError(
            problem, hint="use the site's name as written in the plan's `sites`, e.g. site-a"
        )
    return name


def _colons(digest: bytes) -> str:
    return "SHA256:" + ":".join(f"{b:02X}" for b in digest)


def fingerprint(cert_pem: bytes) -> str:
    """``SHA256:AB:CD:…`` over the certificate's DER encoding (PEM or DER accepted)."""
    cert = load_cert(cert_pem, "certificate")
    return _colons(cert.fingerprint(hashes.SHA256()))


def public_key_der(
    holder: x509.Certificate | x509.CertificateSigningRequest | ec.EllipticCurvePrivateKey,
) -> bytes:
    """The SubjectPublicKeyInfo DER of the public key in a certificate, request or key."""
    return holder.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_fingerprint(pem: bytes) -> str:
    """``SHA256:AB:CD:…`` of the public key (its SubjectPublicKeyInfo DER) in a
    certificate signing request, a certificate or a private key."""
    if b"CERTIFICATE REQUEST" in pem:
        spki = public_key_der(load_csr(pem))
    elif b"PRIVATE KEY" in pem:
        spki = public_key_der(load_private_key(pem, "private key"))
    else:
        spki = public_key_der(load_cert(pem, "certificate"))
    return _colons(hashlib.sha256(spki).digest())


def common_name(name: x509.Name, what: str) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise CertificateError(
            f"the {what} has no single common name (CN)",
            hint="make it with `fedloom pki request --name SITE`",
        )
    return values[0].value


def cert_info(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        name=common_name(cert.subject, "certificate"),
        fingerprint=_colons(cert.fingerprint(hashes.SHA256())),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
    )


def peer_identity(cert_der_or_pem: bytes) -> tuple[str, int]:
    """(common name, serial) of a peer's certificate, PEM or DER (gRPC's auth context
    holds the PEM under ``x509_pem_cert``)."""
    cert = load_cert(cert_der_or_pem, "peer certificate")
    return common_name(cert.subject, "peer certificate"), cert.serial_number


def check_peer_chain(cert_pem: bytes, ca: x509.Certificate) -> None:
    """:class:`CertificateError` unless a peer's certificate keeps fedloom's one-level
    chain, which the TLS library does not enforce: signed directly by the federation's
    CA (whose ``pathlen:0`` allows no intermediate CA below it) and not a CA itself."""
    cert = load_cert(cert_pem, "peer certificate")
    name = common_name(cert.subject, "peer certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        issuer = cert.issuer.rfc4514_string()
        raise CertificateError(
            f"the certificate of {name!r} (serial {cert.serial_number:x}) was not issued "
            f"directly by the federation's CA but by {issuer!r}: the CA's path length (0) "
            "allows no intermediate CA",
            hint="the federation's CA signs each site's request itself (`fedloom pki sign`)",
        ) from err
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if constraints.ca:
        raise CertificateError(
            f"the certificate of {name!r} (serial {cert.serial_number:x}) is a CA "
            "certificate: a site's certificate cannot sign others",
            hint="the federation's CA signs each site's request itself (`fedloom pki sign`)",
        )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ----------------------------------------------------------------- loading


def load_cert(data: bytes, what: str) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise CertificateError(
            f"the {what} is not a valid X.509 certificate",
            hint="pass the .crt file that `fedloom pki sign` wrote, unchanged",
        ) from err


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as err:
        raise CertificateError(
            "not a valid PEM certificate signing request",
            hint="pass the SITE.csr file that `fedloom pki request` wrote, unchanged",
        ) from err


def load_private_key(data: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(
            f"the {what} is not an unencrypted PEM private key",
            hint="it was changed or replaced; restore it from the original folder",
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(
            f"the {what} is a {type(key).__name__}, not the EC key fedloom made",
            hint="restore the key fedloom generated",
        )
    return key


def read_file(path: Path, *, missing_hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise CertificateError(f"{path} does not exist", hint=missing_hint) from err
    except OSError as err:
        raise CertificateError(f"cannot read {path}: {err.strerror}", hint=missing_hint) from err


def read_key_file(path: Path, *, missing_hint: str) -> bytes:
    """A private key file's bytes; refused if others can read it (as ssh does)."""
    data = read_file(path, missing_hint=missing_hint)
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise CertificateError(
            f"{path} can be read by other users (mode {stat.S_IMODE(path.stat().st_mode):o})",
            hint=f"chmod 600 {path}",
        )
    return data


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# ----------------------------------------------------------------- writing


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0700 if it does not exist."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass


write_atomic = functools.partial(files.write_atomic, error=CertificateError)
"""``core.files.write_atomic``, whose failure is a :class:`CertificateError` unless the
caller names another kind of file."""


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_atomic(path, private_key_pem(key), mode=0o600)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key: fast to make, and accepted by gRPC's TLS on every platform."""
    return ec.generate_private_key(ec.SECP256R1())


def check_issued_and_current(
    cert: x509.Certificate,
    ca: x509.Certificate,
    *,
    not_issued: str,
    not_issued_hint: str,
    not_current_hint: str,
) -> None:
    """:class:`CertificateError` unless ``ca`` signed ``cert`` and it is valid now:
    ``not_issued`` (and its hint) says what was wrong in the first case."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CertificateError(not_issued, hint=not_issued_hint) from err
    stamp = now()
    if not cert.not_valid_before_utc <= stamp < cert.not_valid_after_utc:
        name = common_name(cert.subject, "certificate")
        raise CertificateError(
            f"the certificate for {name!r} is not valid now (valid from "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)",
            hint=not_current_hint,
        )
