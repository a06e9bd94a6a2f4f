"""The register of issued site certificates, ``WORKSPACE/pki/issued``: signing a
site's request, revoking, listing.

``issued/<name>.crt`` is the certificate a site now holds. A certificate replaced by a
re-issue while still valid is kept under ``issued/superseded/`` so that revoking the
name revokes it too.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.core.errors import CertificateError
from fedloom.pki.authority import INIT_HINT, check_days, crl_pem, load_ca, sign_leaf
from fedloom.pki.common import (
    CRL_FILE,
    ISSUED_DIR,
    SUPERSEDED_DIR,
    CertInfo,
    cert_info,
    cert_to_pem,
    check_name,
    common_name,
    load_cert,
    load_csr,
    now,
    public_key_der,
    read_file,
    write_atomic,
)
from fedloom.pki.revocation import crl_number, load_crl, revoked_serials


def sign_request(
    pki_dir: Path, csr_pem: bytes, *, allowed: Collection[str], days: int = 825
) -> tuple[bytes, CertInfo]:
    """Sign a site's request: a client certificate for its CN, if the CN is in
    ``allowed`` (the plan's roster). Writes ``issued/<name>.crt``.

    Refused: a request whose signature does not verify; a CN not in ``allowed``; a CN
    that holds a valid certificate for another key (revoke it first); a key whose
    certificate was revoked (the site makes a new key).
    """
    pki_dir = Path(pki_dir)
    check_days(days)
    csr = load_csr(csr_pem)
    if not csr.is_signature_valid:
        raise CertificateError(
            "the signing request's signature does not verify: it was changed after the "
            "site made it",
            hint="ask the site for its site.csr again, unchanged",
        )
    name = check_name(common_name(csr.subject, "signing request"))
    if name not in allowed:
        roster = sorted(allowed)
        shown = ", ".join(roster[:5]) + (f" … ({len(roster)} in all)" if len(roster) > 5 else "")
        raise CertificateError(
            f"{name!r} is not a site of this federation (sites: {shown or 'none'})",
            hint=f"add {name} to `sites` in federation.yaml, then sign again",
        )
    key, ca = load_ca(pki_dir)
    spki = public_key_der(csr)
    revoked = revoked_serials(_load_crl(pki_dir, ca))
    current = _current(pki_dir, name)
    for old in ([current] if current else []) + _superseded_certs(pki_dir, name):
        if old.serial_number in revoked and public_key_der(old) == spki:
            raise CertificateError(
                f"{name}'s certificate for this key was revoked (serial "
                f"{old.serial_number:x}); the key is not certified again",
                hint="at the site, delete site.key and run `fedloom pki request` to make a new key",
            )
    if current is not None and _valid(current, revoked) and public_key_der(current) != spki:
        raise CertificateError(
            f"{name} already has a valid certificate (serial {current.serial_number:x}) "
            "for another key",
            hint=f"if the site's key changed, run `fedloom pki revoke WORKSPACE {name}` "
            "first, then sign again",
        )
    cert = sign_leaf(
        key,
        ca,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
        public_key=csr.public_key(),
        days=days,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    if current is not None:
        _supersede(pki_dir, current)
    pem = cert_to_pem(cert)
    write_atomic(pki_dir / ISSUED_DIR / f"{name}.crt", pem)
    return pem, cert_info(cert)


def revoke(pki_dir: Path, name: str) -> CertInfo:
    """Put the certificate issued to ``name`` (and any earlier one it replaced that is
    still unexpired) on the CRL. Revoking again changes nothing."""
    pki_dir = Path(pki_dir)
    check_name(name)
    current = _current(pki_dir, name)
    if current is None:
        raise CertificateError(
            f"no certificate was issued to {name!r} by this CA",
            hint="`fedloom pki list WORKSPACE` shows the certificates issued",
        )
    key, ca = load_ca(pki_dir)
    crl = _load_crl(pki_dir, ca)
    revoked = revoked_serials(crl)
    stamp = now()
    added = {
        cert.serial_number: stamp
        for cert in [current, *_superseded_certs(pki_dir, name)]
        if cert.serial_number not in revoked and cert.not_valid_after_utc > stamp
    }
    if current.serial_number not in revoked:
        added[current.serial_number] = stamp
    if added:
        pem = crl_pem(key, ca, {**revoked, **added}, crl_number(crl) + 1)
        write_atomic(pki_dir / CRL_FILE, pem)
    return cert_info(current)


def issued_certificates(pki_dir: Path) -> list[CertInfo]:
    """The certificate now issued to each site, by name."""
    folder = Path(pki_dir) / ISSUED_DIR
    infos = []
    for path in sorted(folder.glob("*.crt")):
        infos.append(cert_info(load_cert(read_file(path, missing_hint=INIT_HINT), str(path))))
    return infos


# ----------------------------------------------------------------- helpers


def _load_crl(pki_dir: Path, ca: x509.Certificate) -> x509.CertificateRevocationList:
    path = pki_dir / CRL_FILE
    return load_crl(read_file(path, missing_hint=INIT_HINT), ca, str(path))


def _valid(cert: x509.Certificate, revoked: Collection[int]) -> bool:
    return cert.serial_number not in revoked and cert.not_valid_after_utc > now()


def _current(pki_dir: Path, name: str) -> x509.Certificate | None:
    path = pki_dir / ISSUED_DIR / f"{name}.crt"
    if not path.exists():
        return None
    return load_cert(read_file(path, missing_hint=INIT_HINT), str(path))


def _superseded(pki_dir: Path) -> list[Path]:
    return sorted((pki_dir / ISSUED_DIR / SUPERSEDED_DIR).glob("*.crt"))


def _superseded_certs(pki_dir: Path, name: str) -> list[x509.Certificate]:
    certs = []
    for path in _superseded(pki_dir):
        cert = load_cert(read_file(path, missing_hint=INIT_HINT), str(path))
        if common_name(cert.subject, str(path)) == name:
            certs.append(cert)
    return certs


def _supersede(pki_dir: Path, cert: x509.Certificate) -> None:
    """Keep a certificate being replaced until it expires, so that revoking its name
    revokes it too and a revoked key stays refused; forget replaced ones that expired."""
    folder = pki_dir / ISSUED_DIR / SUPERSEDED_DIR
    folder.mkdir(exist_ok=True)
    stamp = now()
    for path in _superseded(pki_dir):
        old = load_cert(read_file(path, missing_hint=INIT_HINT), str(path))
        if old.not_valid_after_utc <= stamp:
            path.unlink(missing_ok=True)
    if cert.not_valid_after_utc > stamp:
        name = common_name(cert.subject, "certificate")
        write_atomic(folder / f"{name}.{cert.serial_number:x}.crt", cert_to_pem(cert))
