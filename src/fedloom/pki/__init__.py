"""The federation's PKI: a CA in the workspace, keys made and kept by each site.

``WORKSPACE/pki/`` holds the CA (``ca.key``, ``ca.crt``), the revocation list
(``crl.pem``), every site certificate issued (``issued/<name>.crt``) and the
aggregator's server identity (``aggregator.key``, ``aggregator.crt``). A site's state
folder (``WORKSPACE/sites/<name>`` by default) holds ``site.key``, which never leaves
it, ``site.csr``, and once accepted ``site.crt`` and ``ca.crt``.

Private keys are unencrypted PEM (PKCS#8) files of mode 0600 in folders of mode 0700:
protect those folders as you would an SSH key. Keys are EC P-256.
"""

from fedloom.pki.authority import init_ca, issue_server_cert, server_hosts
from fedloom.pki.common import CertInfo, fingerprint, key_fingerprint, peer_identity
from fedloom.pki.credentials import Credentials, server_credentials, site_credentials
from fedloom.pki.issued import issued_certificates, revoke, sign_request
from fedloom.pki.provision import provision
from fedloom.pki.revocation import RevocationList
from fedloom.pki.site import accept_certificate, request_certificate

__all__ = [
    "CertInfo",
    "Credentials",
    "RevocationList",
    "accept_certificate",
    "fingerprint",
    "init_ca",
    "issue_server_cert",
    "issued_certificates",
    "key_fingerprint",
    "peer_identity",
    "provision",
    "request_certificate",
    "revoke",
    "server_credentials",
    "server_hosts",
    "sign_request",
    "site_credentials",
]
