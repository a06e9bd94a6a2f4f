"""The whole PKI dance on one machine: a CA, then each site's key, request, signature
and acceptance, through the same functions a real federation uses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedloom.pki.authority import INIT_HINT, init_ca
from fedloom.pki.common import CA_CERT, CA_KEY, pki_dir_of, read_file, site_state_dir
from fedloom.pki.issued import sign_request
from fedloom.pki.site import accept_certificate, request_certificate


def provision(
    workspace: Path,
    names: Sequence[str],
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    federation: str | None = None,
) -> dict[str, Path]:
    """Every step of the PKI on one machine, for a local multi-process federation or a
    test: the CA in ``WORKSPACE/pki`` (an existing one is reused, and so is its
    aggregator certificate), then for each site a key and request in
    ``WORKSPACE/sites/<name>``, signed by the CA with ``names`` as the roster, and
    accepted. Returns each site's state folder.

    ``federation`` names a new CA (default: the workspace folder's name).
    """
    workspace = Path(workspace)
    pki_dir = pki_dir_of(workspace)
    if not (pki_dir / CA_KEY).exists():
        name = federation or workspace.resolve().name or "fedloom"
        init_ca(pki_dir, federation=name, hosts=hosts)
    ca_pem = read_file(pki_dir / CA_CERT, missing_hint=INIT_HINT)
    folders = {}
    for name in names:
        state_dir = site_state_dir(workspace, name)
        csr_path, _ = request_certificate(state_dir, name)
        cert_pem, _ = sign_request(pki_dir, csr_path.read_bytes(), allowed=names)
        accept_certificate(state_dir, cert_pem, ca_pem)
        folders[name] = state_dir
    return folders
