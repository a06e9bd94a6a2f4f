"""The certificate revocation list: ``pki/crl.pem``, signed by the federation's CA.

:class:`RevocationList` is the aggregator's view of it. It re-reads the file whenever
it changes on disk, so ``fedloom pki revoke`` applies to a running aggregator at the
next call, without a restart.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedloom.core.errors import CertificateError
from fedloom.pki.common import load_cert, now, read_file

_CRL_HINT = (
    "crl.pem is the only record of the revoked certificates: restore it from a backup "
    "(`fedloom pki init WORKSPACE --force` makes a new CA, and every site a new certificate)"
)


def load_crl(data: bytes, ca: x509.Certificate, source: str) -> x509.CertificateRevocationList:
    """The CRL in ``data``, verified to be signed by ``ca``."""
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as err:
        raise CertificateError(
            f"{source} is not a valid PEM revocation list", hint=_CRL_HINT
        ) from err
    try:
        signed = crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        signed = False
    if not signed:
        raise CertificateError(
            f"{source} was not signed by this federation's CA",
            hint="use the crl.pem of the same pki/ folder as ca.crt",
        )
    return crl


def revoked_serials(crl: x509.CertificateRevocationList) -> dict[int, dt.datetime]:
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def build_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    revoked: Mapping[int, dt.datetime],
    number: int,
) -> x509.CertificateRevocationList:
    """A CRL listing ``revoked`` (serial: revocation date), valid until the CA expires."""
    stamp = now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(stamp)
        .next_update(max(ca.not_valid_after_utc, stamp + dt.timedelta(days=1)))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, when in sorted(revoked.items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, hashes.SHA256())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


class RevocationList:
    """The revoked serials of ``crl_path``, verified against the CA in ``ca_pem``.

    :meth:`is_revoked` re-reads the file when its size, modification time or inode
    changed, so a revocation written while the aggregator runs applies at its next
    check. Safe to call from many threads. A file that becomes unreadable or is not
    signed by the CA raises :class:`~fedloom.core.errors.CertificateError` from
    :meth:`is_revoked` (the caller refuses the connection) until it is fixed.
    """

    def __init__(self, crl_path: Path, ca_pem: bytes) -> None:
        self._path = Path(crl_path)
        self._ca = load_cert(ca_pem, "CA certificate")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[int] = frozenset()
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        hint = (
            "a workspace without a CA yet: run `fedloom pki init WORKSPACE`; one with a CA "
            "lost its crl.pem, the only record of revoked certificates: restore it from a backup"
        )
        try:
            st = os.stat(self._path)
        except OSError as err:
            raise CertificateError(f"cannot read {self._path}: {err.strerror}", hint=hint) from err
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        crl = load_crl(read_file(self._path, missing_hint=hint), self._ca, str(self._path))
        self._revoked = frozenset(revoked_serials(crl))
        self._stamp = stamp

    def is_revoked(self, serial: int) -> bool:
        """Whether the certificate with ``serial`` is on the list as it is on disk now."""
        with self._lock:
            self._refresh()
            return serial in self._revoked
