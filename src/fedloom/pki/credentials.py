"""What a TLS endpoint loads: its key, its certificate and the CA it trusts, as PEM
bytes ready for ``grpc.ssl_server_credentials`` / ``grpc.ssl_channel_credentials``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedloom.pki.common import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    SITE_CA,
    SITE_CERT,
    SITE_KEY,
    read_file,
    read_key_file,
)


@dataclass(frozen=True)
class Credentials:
    """A private key, its certificate, and the CA certificate that checks the peer."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:  # never print a private key by accident
        return f"Credentials(key_pem=<{len(self.key_pem)} bytes>, cert_pem=…, ca_pem=…)"


def server_credentials(pki_dir: Path) -> Credentials:
    """The aggregator's key and certificate and the federation's CA, from ``pki_dir``."""
    pki_dir = Path(pki_dir)
    hint = f"run `fedloom pki init WORKSPACE` (this reads {pki_dir})"
    return Credentials(
        key_pem=read_key_file(pki_dir / SERVER_KEY, missing_hint=hint),
        cert_pem=read_file(pki_dir / SERVER_CERT, missing_hint=hint),
        ca_pem=read_file(pki_dir / CA_CERT, missing_hint=hint),
    )


def site_credentials(state_dir: Path) -> Credentials:
    """The site's key and certificate and the CA it trusts, from its state folder."""
    state_dir = Path(state_dir)
    key = read_key_file(
        state_dir / SITE_KEY,
        missing_hint="run `fedloom pki request --name SITE` to make the site's key, then "
        "have the CA sign SITE.csr and run `fedloom pki accept`",
    )
    accept = (
        "have the federation's CA sign SITE.csr (`fedloom pki sign WORKSPACE SITE.csr`), "
        "then run `fedloom pki accept --name SITE --cert SITE.crt --ca ca.crt`"
    )
    return Credentials(
        key_pem=key,
        cert_pem=read_file(state_dir / SITE_CERT, missing_hint=accept),
        ca_pem=read_file(state_dir / SITE_CA, missing_hint=accept),
    )
