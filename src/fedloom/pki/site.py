"""A site's side of the PKI, in its state folder (``WORKSPACE/sites/NAME`` by default).

The site makes its own key, ``site.key``, which never leaves the folder; it sends
``NAME.csr`` to the federation's CA and installs what comes back with
:func:`accept_certificate`. The folder is created with mode 0700 and may hold other
site state besides these files.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.core.errors import CertificateError
from fedloom.pki.common import (
    SITE_CA,
    SITE_CERT,
    SITE_KEY,
    CertInfo,
    cert_info,
    cert_to_pem,
    check_issued_and_current,
    check_name,
    common_name,
    csr_file,
    key_fingerprint,
    load_cert,
    load_csr,
    load_private_key,
    make_private_dir,
    new_key,
    public_key_der,
    read_file,
    read_key_file,
    write_atomic,
    write_private_key,
)
from fedloom.pki.credentials import Credentials

REQUEST_HINT = "run `fedloom pki request --name SITE` at the site first"


def request_certificate(state_dir: Path, name: str) -> tuple[Path, str]:
    """Make the site's key (``site.key``, mode 0600) and signing request (``NAME.csr``,
    CN ``name``) in ``state_dir``. Returns the request's path and the key's fingerprint.

    A key already there for ``name`` is kept and the request written again; a key that
    belongs to another site's name is refused.
    """
    state_dir = Path(state_dir)
    check_name(name)
    key_path = state_dir / SITE_KEY
    if key_path.exists():
        owner = _key_owner(state_dir)
        if owner is not None and owner != name:
            raise CertificateError(
                f"{state_dir} already holds the key of site {owner!r}, not {name!r}",
                hint="give each site its own folder with --state DIR",
            )
        key = load_private_key(read_key_file(key_path, missing_hint=REQUEST_HINT), str(key_path))
    else:
        make_private_dir(state_dir)
        key = new_key()
        write_private_key(key_path, key)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM)
    path = state_dir / csr_file(name)
    write_atomic(path, pem)
    return path, key_fingerprint(pem)


def accept_certificate(state_dir: Path, cert_pem: bytes, ca_pem: bytes) -> CertInfo:
    """Install the certificate the CA signed (``site.crt``) and the CA's certificate
    (``ca.crt``) in ``state_dir``, after checking that the certificate is for this
    site's key and name, is signed by that CA, and is valid now."""
    state_dir = Path(state_dir)
    key_path = state_dir / SITE_KEY
    key = load_private_key(read_key_file(key_path, missing_hint=REQUEST_HINT), str(key_path))
    cert = load_cert(cert_pem, "site certificate")
    ca = load_cert(ca_pem, "CA certificate")
    info = cert_info(cert)
    if public_key_der(cert) != public_key_der(key):
        raise CertificateError(
            f"the certificate for {info.name!r} is for another key than {key_path}",
            hint="install the certificate the CA signed from this folder's SITE.csr",
        )
    owner = _key_owner(state_dir, certificate=False)
    if owner is not None and owner != info.name:
        raise CertificateError(
            f"the certificate is for {info.name!r} but this folder asked for {owner!r}",
            hint="install the certificate issued for this site",
        )
    _check_ca(ca)
    check_issued_and_current(
        cert,
        ca,
        not_issued=f"the certificate for {info.name!r} was not signed by the CA in the given "
        "ca.crt",
        not_issued_hint="ask the federation for its ca.crt and the certificate it signed, and "
        "compare the fingerprints over another channel",
        not_current_hint="check this machine's clock, or ask the CA to sign SITE.csr again",
    )
    if not _has_usage(cert, ExtendedKeyUsageOID.CLIENT_AUTH):
        raise CertificateError(
            f"the certificate for {info.name!r} is not a client certificate",
            hint="install the certificate `fedloom pki sign` wrote for this site",
        )
    write_atomic(state_dir / SITE_CA, cert_to_pem(ca))
    write_atomic(state_dir / SITE_CERT, cert_to_pem(cert))
    return info


def check_own_certificate(state_dir: Path, credentials: Credentials) -> None:
    """Before a site connects: its ``site.crt`` was signed by the CA in its ``ca.crt``
    and is valid now, so that an aggregator of that CA, which would close the connection
    in the TLS handshake, is not blamed for it."""
    state_dir = Path(state_dir)
    cert = load_cert(credentials.cert_pem, str(state_dir / SITE_CERT))
    ca = load_cert(credentials.ca_pem, str(state_dir / SITE_CA))
    name = common_name(cert.subject, str(state_dir / SITE_CERT))
    check_issued_and_current(
        cert,
        ca,
        not_issued=f"this site's certificate {state_dir / SITE_CERT} ({name!r}) was not signed "
        f"by the CA in {state_dir / SITE_CA} but by {cert.issuer.rfc4514_string()!r}: the "
        "federation's aggregator would refuse it in the TLS handshake",
        not_issued_hint="install the certificate the federation's CA signed for this site, "
        "with the federation's ca.crt (`fedloom pki accept --name SITE --cert SITE.crt --ca "
        "ca.crt`)",
        not_current_hint="check this machine's clock, or ask the CA to sign SITE.csr again",
    )


def _key_owner(state_dir: Path, *, certificate: bool = True) -> str | None:
    """The site name the key in ``state_dir`` was made for, from its certificate or its
    request; None when neither is there."""
    cert_path = state_dir / SITE_CERT
    if certificate and cert_path.exists():
        cert = load_cert(read_file(cert_path, missing_hint=REQUEST_HINT), str(cert_path))
        return common_name(cert.subject, str(cert_path))
    for csr_path in sorted(state_dir.glob("*.csr")):  # NAME.csr (site.csr before 0.2)
        if csr_path.is_file():
            csr = load_csr(read_file(csr_path, missing_hint=REQUEST_HINT))
            return common_name(csr.subject, str(csr_path))
    return None


def _check_ca(ca: x509.Certificate) -> None:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(
            f"{cert_info(ca).name!r} is not a CA certificate",
            hint="pass the federation's ca.crt with --ca",
        )


def _has_usage(cert: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    try:
        return usage in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
