"""The federation's certificate authority, kept in ``WORKSPACE/pki``.

It signs the aggregator's server certificate and each site's signing request (for the
sites in the plan only), and revokes. Sites make their own keys: no site key is ever
made or seen here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.core.errors import CertificateError
from fedloom.pki.common import (
    CA_CERT,
    CA_KEY,
    CLOCK_SKEW,
    CRL_FILE,
    ISSUED_DIR,
    SERVER_CERT,
    SERVER_KEY,
    SERVER_NAME,
    SUPERSEDED_DIR,
    CertInfo,
    cert_info,
    cert_to_pem,
    load_cert,
    load_private_key,
    make_private_dir,
    new_key,
    now,
    public_key_der,
    read_file,
    read_key_file,
    write_atomic,
    write_private_key,
)
from fedloom.pki.revocation import build_crl

CA_DAYS = 3650
"""How long the CA certificate is valid, in days, unless ``init_ca`` is told otherwise."""

_DNS_LABEL = re.compile(r"\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

INIT_HINT = "run `fedloom pki init WORKSPACE`"


def init_ca(
    pki_dir: Path,
    *,
    federation: str,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 825,
    force: bool = False,
    ca_days: int = CA_DAYS,
) -> CertInfo:
    """Create the federation's CA in ``pki_dir``: an EC P-256 key, a self-signed CA
    certificate valid ``ca_days``, an empty CRL, and the aggregator's server certificate
    for ``hosts`` valid ``days``. Returns the CA certificate's info.

    Refuses if ``pki_dir`` already holds a CA key, unless ``force``; ``force`` starts a
    new CA and forgets every certificate issued by the old one (they stop working).
    """
    pki_dir = Path(pki_dir)
    if (pki_dir / CA_KEY).exists() and not force:
        raise CertificateError(
            f"{pki_dir / CA_KEY} exists: this workspace already has a CA",
            hint="keep it; or pass --force to start a new CA (every certificate issued so "
            "far stops working)",
        )
    if not federation.strip():
        raise CertificateError("the federation needs a name", hint="set `name` in the plan")
    check_days(days, ca_days)
    names = _host_names(hosts)  # bad hosts are refused before anything is written
    make_private_dir(pki_dir)
    (pki_dir / ISSUED_DIR).mkdir(exist_ok=True)
    if force:
        issued = pki_dir / ISSUED_DIR
        for old in [*issued.glob("*.crt"), *(issued / SUPERSEDED_DIR).glob("*.crt")]:
            old.unlink()

    key = new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation[:61]} CA"),
        ]
    )
    stamp = now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(stamp - CLOCK_SKEW)
        .not_valid_after(stamp + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(pki_dir / CA_CERT, cert_to_pem(ca))
    write_atomic(pki_dir / CRL_FILE, crl_pem(key, ca, {}, 1))
    _issue_server(pki_dir, key, ca, names, days)
    write_private_key(pki_dir / CA_KEY, key)  # last: a CA key means a complete CA
    return cert_info(ca)


def issue_server_cert(pki_dir: Path, hosts: Sequence[str], *, days: int = 825) -> CertInfo:
    """(Re)issue the aggregator's server certificate, with a fresh key, for ``hosts``
    (DNS names or IP addresses, the names sites use to reach it)."""
    pki_dir = Path(pki_dir)
    check_days(days)
    names = _host_names(hosts)
    key, ca = load_ca(pki_dir)
    return _issue_server(pki_dir, key, ca, names, days)


def server_hosts(pki_dir: Path) -> tuple[str, ...]:
    """The DNS names and IP addresses the aggregator's certificate is valid for."""
    path = Path(pki_dir) / SERVER_CERT
    cert = load_cert(read_file(path, missing_hint=INIT_HINT), str(path))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(n.value) for n in san if isinstance(n, x509.DNSName | x509.IPAddress))


def load_ca(pki_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    pki_dir = Path(pki_dir)
    key = load_private_key(
        read_key_file(pki_dir / CA_KEY, missing_hint=INIT_HINT), str(pki_dir / CA_KEY)
    )
    ca = load_cert(read_file(pki_dir / CA_CERT, missing_hint=INIT_HINT), str(pki_dir / CA_CERT))
    if public_key_der(ca) != public_key_der(key):
        raise CertificateError(
            f"{pki_dir / CA_KEY} and {pki_dir / CA_CERT} do not belong together",
            hint="restore both from the same backup, or `fedloom pki init --force` for a new CA",
        )
    return key, ca


# ----------------------------------------------------------------- helpers


def check_days(*values: int) -> None:
    for days in values:
        if days < 1:
            raise CertificateError(
                f"a certificate must be valid at least 1 day (got {days})",
                hint="pass a positive --days",
            )


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not all(_DNS_LABEL.fullmatch(part) for part in host.split(".")):
            raise CertificateError(
                f"{host!r} is neither a DNS name nor an IP address",
                hint="pass each name or address sites use to reach the aggregator, e.g. "
                "--host agg.example.org --host 10.0.0.5",
            )
        names.append(x509.DNSName(host))
    if not names:
        raise CertificateError(
            "the aggregator's certificate needs at least one host",
            hint="pass --host NAME_OR_IP",
        )
    return names


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def sign_leaf(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    *,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    days: int,
    usage: x509.ObjectIdentifier,
    hosts: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """A leaf certificate signed by the CA, never valid beyond the CA itself."""
    stamp = now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(stamp - CLOCK_SKEW)
        .not_valid_after(min(stamp + dt.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(hosts), critical=False)
    return builder.sign(key, hashes.SHA256())


def _issue_server(
    pki_dir: Path,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    hosts: Sequence[x509.GeneralName],
    days: int,
) -> CertInfo:
    key = new_key()
    cert = sign_leaf(
        ca_key,
        ca,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]),
        public_key=key.public_key(),
        days=days,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        hosts=hosts,
    )
    write_private_key(pki_dir / SERVER_KEY, key)
    write_atomic(pki_dir / SERVER_CERT, cert_to_pem(cert))
    return cert_info(cert)


def crl_pem(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    revoked: dict[int, dt.datetime],
    number: int,
) -> bytes:
    return build_crl(key, ca, revoked, number).public_bytes(serialization.Encoding.PEM)
