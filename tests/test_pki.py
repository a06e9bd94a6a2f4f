"""The federation's PKI with real keys, certificates, CRLs and a real TLS handshake."""

from __future__ import annotations

import base64
import hashlib
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner
from workspaces import make_workspace, run_cli

from fedloom.cli.main import app
from fedloom.core.errors import CertificateError
from fedloom.pki import (
    RevocationList,
    accept_certificate,
    fingerprint,
    init_ca,
    issue_server_cert,
    issued_certificates,
    key_fingerprint,
    peer_identity,
    provision,
    request_certificate,
    revoke,
    server_credentials,
    sign_request,
    site_credentials,
)

pytestmark = pytest.mark.server

FINGERPRINT = re.compile(r"SHA256(:[0-9A-F]{2}){32}")


def _ca(root: Path, federation: str = "fed") -> Path:
    pki = root / "pki"
    init_ca(pki, federation=federation)
    return pki


def _csr(state: Path, name: str) -> bytes:
    path, _ = request_certificate(state, name)
    return path.read_bytes()


def _modes(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------- the library


def test_provision_gives_each_site_working_credentials(tmp_path: Path) -> None:
    folders = provision(tmp_path, ["site-a", "site-b"])
    assert folders == {n: tmp_path / "sites" / n for n in ("site-a", "site-b")}
    server = server_credentials(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate(server.ca_pem)
    for name, state in folders.items():
        creds = site_credentials(state)
        cert = x509.load_pem_x509_certificate(creds.cert_pem)
        cert.verify_directly_issued_by(ca)
        assert creds.ca_pem == server.ca_pem
        assert key_fingerprint(creds.key_pem) == key_fingerprint(creds.cert_pem)
        assert peer_identity(creds.cert_pem) == (name, cert.serial_number)
        assert FINGERPRINT.fullmatch(fingerprint(creds.cert_pem))
    assert [i.name for i in issued_certificates(tmp_path / "pki")] == ["site-a", "site-b"]
    # again: the CA and the site keys are reused, the certificates issued afresh
    ca_before = fingerprint(server.ca_pem)
    key_before = site_credentials(folders["site-a"]).key_pem
    provision(tmp_path, ["site-a", "site-b"])
    assert fingerprint(server_credentials(tmp_path / "pki").ca_pem) == ca_before
    assert site_credentials(folders["site-a"]).key_pem == key_before


def test_fingerprint_is_sha256_of_the_der_and_peer_identity_takes_pem_or_der(
    tmp_path: Path,
) -> None:
    state = provision(tmp_path, ["site-a"])["site-a"]
    pem = site_credentials(state).cert_pem
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    assert fingerprint(pem) == "SHA256:" + ":".join(
        digest[i : i + 2] for i in range(0, len(digest), 2)
    )
    assert peer_identity(der) == peer_identity(pem)
    assert peer_identity(pem)[0] == "site-a"


def test_a_site_key_is_private_and_never_copied_into_the_ca_folder(tmp_path: Path) -> None:
    state = provision(tmp_path, ["site-a"])["site-a"]
    key = state / "site.key"
    assert _modes(key) == 0o600 and _modes(state) == 0o700
    assert _modes(tmp_path / "pki" / "ca.key") == 0o600
    assert _modes(tmp_path / "pki" / "aggregator.key") == 0o600
    key_body = b"".join(key.read_bytes().splitlines()[1:-1])
    for path in (tmp_path / "pki").rglob("*"):
        if path.is_file():
            assert key_body not in b"".join(path.read_bytes().splitlines()), path
    key.chmod(0o644)
    with pytest.raises(CertificateError, match="read by other users") as err:
        site_credentials(state)
    assert "chmod 600" in str(err.value)


def test_request_checks_the_name_and_keeps_one_key_per_folder(tmp_path: Path) -> None:
    for bad in ("", "a/b", "..", "x" * 65, "sité"):
        with pytest.raises(CertificateError, match="cannot name a site"):
            request_certificate(tmp_path / "s", bad)
    path, fp = request_certificate(tmp_path / "s", "site-a")
    assert path == tmp_path / "s" / "site-a.csr" and FINGERPRINT.fullmatch(fp)
    assert request_certificate(tmp_path / "s", "site-a")[1] == fp  # same key, CSR again
    with pytest.raises(CertificateError, match="key of site 'site-a', not 'site-b'"):
        request_certificate(tmp_path / "s", "site-b")
    # an existing folder (with other site state) is used as it is
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "audit.log").write_text("kept\n")
    request_certificate(tmp_path / "t", "site-b")
    assert (tmp_path / "t" / "audit.log").read_text() == "kept\n"


def test_sign_refuses_a_site_that_is_not_in_the_plan(tmp_path: Path) -> None:
    pki = _ca(tmp_path)
    csr = _csr(tmp_path / "s", "intruder")
    with pytest.raises(CertificateError) as err:
        sign_request(pki, csr, allowed=["site-a", "site-b"])
    assert "'intruder' is not a site" in err.value.message and "site-a" in err.value.message
    assert err.value.hint is not None and "federation.yaml" in err.value.hint
    assert not (pki / "issued" / "intruder.crt").exists()


def test_sign_refuses_a_tampered_request(tmp_path: Path) -> None:
    pki = _ca(tmp_path)
    csr = x509.load_pem_x509_csr(_csr(tmp_path / "s", "site-a"))
    der = csr.public_bytes(Encoding.DER)
    assert der.count(b"site-a") == 1
    forged = der.replace(b"site-a", b"site-b")
    body = base64.encodebytes(forged).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    pem = b"\n".join(
        [b"-----BEGIN CERTIFICATE REQUEST-----", *lines, b"-----END CERTIFICATE REQUEST-----\n"]
    )
    with pytest.raises(CertificateError, match="signature does not verify"):
        sign_request(pki, pem, allowed=["site-a", "site-b"])
    with pytest.raises(CertificateError, match="not a valid PEM certificate signing request"):
        sign_request(pki, b"garbage", allowed=["site-a"])


def test_accept_refuses_another_ca_and_another_key(tmp_path: Path) -> None:
    pki = _ca(tmp_path / "ours")
    other = _ca(tmp_path / "theirs", "other")
    site_a, site_b = tmp_path / "a", tmp_path / "b"
    csr_a, csr_b = _csr(site_a, "site-a"), _csr(site_b, "site-b")
    ca_pem = (pki / "ca.crt").read_bytes()
    foreign, _ = sign_request(other, csr_a, allowed=["site-a"])
    with pytest.raises(CertificateError, match="not signed by the CA"):
        accept_certificate(site_a, foreign, ca_pem)
    cert_b, _ = sign_request(pki, csr_b, allowed=["site-a", "site-b"])
    with pytest.raises(CertificateError, match="for another key"):
        accept_certificate(site_a, cert_b, ca_pem)
    assert not (site_a / "site.crt").exists() and not (site_a / "ca.crt").exists()
    cert_a, info = sign_request(pki, csr_a, allowed=["site-a", "site-b"])
    assert accept_certificate(site_a, cert_a, ca_pem) == info
    assert (site_a / "site.crt").read_bytes() == cert_a


def test_a_name_with_a_valid_certificate_is_not_signed_for_another_key(tmp_path: Path) -> None:
    pki = _ca(tmp_path)
    allowed = ["site-a"]
    first, info = sign_request(pki, _csr(tmp_path / "one", "site-a"), allowed=allowed)
    again, info2 = sign_request(pki, _csr(tmp_path / "one", "site-a"), allowed=allowed)
    assert info2.serial != info.serial  # same key: re-issued
    with pytest.raises(CertificateError, match="already has a valid certificate") as err:
        sign_request(pki, _csr(tmp_path / "two", "site-a"), allowed=allowed)
    assert "fedloom pki revoke" in str(err.value)
    revoke(pki, "site-a")
    # the certificate it replaced is revoked too, and the revoked key is not signed again
    crl = RevocationList(pki / "crl.pem", (pki / "ca.crt").read_bytes())
    assert crl.is_revoked(info.serial) and crl.is_revoked(info2.serial)
    with pytest.raises(CertificateError, match="was revoked"):
        sign_request(pki, _csr(tmp_path / "one", "site-a"), allowed=allowed)
    _, info3 = sign_request(pki, _csr(tmp_path / "two", "site-a"), allowed=allowed)
    assert not crl.is_revoked(info3.serial)


def test_revoke_reaches_a_live_revocation_list(tmp_path: Path) -> None:
    provision(tmp_path, ["site-a", "site-b"])
    pki = tmp_path / "pki"
    ca_pem = (pki / "ca.crt").read_bytes()
    crl = RevocationList(pki / "crl.pem", ca_pem)
    a, b = (
        peer_identity(site_credentials(tmp_path / "sites" / n).cert_pem)[1]
        for n in ("site-a", "site-b")
    )
    assert not crl.is_revoked(a) and not crl.is_revoked(b)
    info = revoke(pki, "site-a")
    assert info.serial == a and info.name == "site-a"
    assert crl.is_revoked(a) and not crl.is_revoked(b)  # the file changed under it
    listed = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert listed.get_revoked_certificate_by_serial_number(a) is not None
    before = (pki / "crl.pem").read_bytes()
    assert revoke(pki, "site-a") == info  # twice: nothing changes
    assert (pki / "crl.pem").read_bytes() == before
    revoke(pki, "site-b")
    assert crl.is_revoked(a) and crl.is_revoked(b)  # earlier entries kept
    with pytest.raises(CertificateError, match="no certificate was issued to 'site-c'"):
        revoke(pki, "site-c")


def test_a_crl_from_another_ca_or_corrupt_is_refused(tmp_path: Path) -> None:
    pki = _ca(tmp_path / "ours")
    other = _ca(tmp_path / "theirs", "other")
    ca_pem = (pki / "ca.crt").read_bytes()
    with pytest.raises(CertificateError, match="not signed by this federation's CA"):
        RevocationList(other / "crl.pem", ca_pem)
    live = RevocationList(pki / "crl.pem", ca_pem)
    (pki / "crl.pem").write_bytes((other / "crl.pem").read_bytes())
    with pytest.raises(CertificateError, match="not signed by this federation's CA"):
        live.is_revoked(1)
    (pki / "crl.pem").write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(CertificateError, match="not a valid PEM revocation list"):
        RevocationList(pki / "crl.pem", ca_pem)


def test_the_server_certificate_carries_the_hosts(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    hosts = ["localhost", "127.0.0.1", "agg.example.org", "::1"]
    init_ca(pki, federation="fed", hosts=hosts)
    cert = x509.load_pem_x509_certificate((pki / "aggregator.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "agg.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "aggregator"
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    info = issue_server_cert(pki, ["agg.internal"])
    assert info.name == "aggregator"
    again = x509.load_pem_x509_certificate((pki / "aggregator.crt").read_bytes())
    names = again.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["agg.internal"]
    with pytest.raises(CertificateError, match="neither a DNS name nor an IP address"):
        issue_server_cert(pki, ["not a host"])


def test_init_refuses_an_existing_ca_unless_forced(tmp_path: Path) -> None:
    provision(tmp_path, ["site-a"])
    pki = tmp_path / "pki"
    first = fingerprint((pki / "ca.crt").read_bytes())
    with pytest.raises(CertificateError, match="already has a CA") as err:
        init_ca(pki, federation="fed")
    assert "--force" in str(err.value)
    info = init_ca(pki, federation="fed", force=True)
    assert info.fingerprint != first and info.name == "fed CA"
    assert issued_certificates(pki) == []


def test_missing_credentials_say_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="aggregator.key does not exist") as err:
        server_credentials(tmp_path / "pki")
    assert "fedloom pki init WORKSPACE" in str(err.value)
    with pytest.raises(CertificateError, match="site.key does not exist") as err:
        site_credentials(tmp_path / "s")
    assert "fedloom pki request" in str(err.value)
    request_certificate(tmp_path / "s", "site-a")
    with pytest.raises(CertificateError, match="site.crt does not exist") as err:
        site_credentials(tmp_path / "s")
    assert "fedloom pki accept" in str(err.value) and "SITE.csr" in str(err.value)


# ----------------------------------------------------------------- real TLS through gRPC


def _echo_server(pki: Path, seen: list[Any]) -> tuple[grpc.Server, int]:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        auth = context.auth_context()
        seen.append((auth.get("x509_common_name"), auth.get("x509_pem_cert")))
        return request

    creds = server_credentials(pki)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    tls = grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", tls)
    server.start()
    return server, port


def _call(port: int, state: Path, ca_pem: bytes | None = None) -> bytes:
    creds = site_credentials(state)
    tls = grpc.ssl_channel_credentials(
        root_certificates=ca_pem or creds.ca_pem,
        private_key=creds.key_pem,
        certificate_chain=creds.cert_pem,
    )
    with grpc.secure_channel(f"localhost:{port}", tls) as channel:
        reply: bytes = channel.unary_unary("/test.Echo/Echo")(b"ping", timeout=10)
        return reply


def test_the_material_works_for_mutual_tls_with_grpc(tmp_path: Path) -> None:
    folders = provision(tmp_path / "ours", ["site-a"])
    stranger = provision(tmp_path / "theirs", ["site-a"])["site-a"]
    seen: list[Any] = []
    server, port = _echo_server(tmp_path / "ours" / "pki", seen)
    try:
        assert _call(port, folders["site-a"]) == b"ping"
        common_names, pems = seen[0]
        assert common_names == [b"site-a"]
        assert peer_identity(pems[0])[0] == "site-a"
        assert peer_identity(pems[0]) == peer_identity(site_credentials(folders["site-a"]).cert_pem)
        # a client certificate from another CA (trusting our server) is refused
        ours = (tmp_path / "ours" / "pki" / "ca.crt").read_bytes()
        with pytest.raises(grpc.RpcError) as err:
            _call(port, stranger, ca_pem=ours)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(seen) == 1
    finally:
        server.stop(None)


# ----------------------------------------------------------------- the command line


def _invoke(*args: str | Path) -> Any:
    result = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(app, [str(a) for a in args])
    return result


def test_cli_walks_a_site_through_the_whole_process(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer", "ws")
    result = _invoke("pki", "init", ws, "--host", "localhost", "--host", "10.0.0.5")
    assert result.exit_code == 0, result.output
    ca_fp = fingerprint((ws / "pki" / "ca.crt").read_bytes())
    assert ca_fp in result.stdout and "localhost, 10.0.0.5" in result.stdout, result.stdout
    assert "breast-cancer" in result.stdout and "fedloom pki request" in result.stdout

    result = _invoke("pki", "request", "--name", "site-01", ws)
    assert result.exit_code == 0, result.output
    csr = ws / "sites" / "site-01" / "site-01.csr"
    assert str(csr) in result.stdout and key_fingerprint(csr.read_bytes()) in result.stdout
    assert "the key stays here" in result.stdout

    out = tmp_path / "to-site" / "site-01.crt"
    out.parent.mkdir()
    result = _invoke("pki", "sign", ws, csr, "--out", out)
    assert result.exit_code == 0, result.output
    cert_fp = fingerprint(out.read_bytes())
    assert cert_fp in result.stdout
    assert (ws / "pki" / "issued" / "site-01.crt").read_bytes() == out.read_bytes()

    state = tmp_path / "site-state"
    result = _invoke("pki", "request", "--name", "site-02", "--state", state)
    assert result.exit_code == 0 and (state / "site.key").exists()

    result = _invoke(
        "pki", "accept", "--name", "site-01", "--cert", out, "--ca", ws / "pki" / "ca.crt", ws
    )
    assert result.exit_code == 0, result.output
    assert cert_fp in result.stdout and ca_fp in result.stdout
    assert (ws / "sites" / "site-01" / "site.crt").read_bytes() == out.read_bytes()

    result = _invoke("pki", "list", ws)
    assert result.exit_code == 0, result.output
    serial = f"{peer_identity(out.read_bytes())[1]:x}"
    row = next(line for line in result.stdout.splitlines() if "site-01" in line)
    assert serial in row and cert_fp.removeprefix("SHA256:")[:17] in row
    assert row.rstrip().endswith("no")

    result = _invoke("pki", "revoke", ws, "site-01")
    assert result.exit_code == 0, result.output
    assert serial in result.stdout and "next call" in result.stdout
    result = _invoke("pki", "revoke", ws, "site-01")
    assert result.exit_code == 0 and "already revoked" in result.stdout
    result = _invoke("pki", "list", ws)
    row = next(line for line in result.stdout.splitlines() if "site-01" in line)
    assert row.rstrip().endswith("yes")

    result = _invoke("pki", "server", ws)  # keeps the hosts
    assert result.exit_code == 0 and "localhost, 10.0.0.5" in result.stdout


def test_cli_errors_exit_10_with_a_hint(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer", "ws")
    assert _invoke("pki", "init", ws).exit_code == 0
    result = _invoke("pki", "init", ws)
    assert result.exit_code == 10 and "already has a CA" in result.stderr
    result = _invoke("pki", "request", "--name", "mallory", ws)
    assert result.exit_code == 0
    # a real process: no traceback, exit code 10, the message and the hint
    proc = run_cli("pki", "sign", str(ws), str(ws / "sites" / "mallory" / "mallory.csr"))
    assert proc.returncode == 10, proc.stderr
    assert "'mallory' is not a site" in proc.stderr and "federation.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = _invoke("pki", "revoke", ws, "site-01")
    assert result.exit_code == 10 and "no certificate was issued" in result.stderr
    result = _invoke("pki", "sign", ws, tmp_path / "missing.csr")
    assert result.exit_code == 10 and "missing.csr does not exist" in result.stderr
    assert "pass the SITE.csr file the site sent you" in result.stderr


def test_the_hand_offs_between_sites_and_the_ca_are_never_left_half_done(tmp_path: Path) -> None:
    """Issue 16.4: each request is named after its site; signing into a missing folder
    creates it (a failed write must not leave an issued certificate behind); init without
    --host and a request for a name the plan lacks warn at once."""
    ws = make_workspace(tmp_path, "breast-cancer", "ws")
    result = _invoke("pki", "init", ws)
    assert result.exit_code == 0, result.output
    assert "warning: no --host given" in result.stderr and "host-name check" in result.stderr
    assert "--host" not in _invoke("pki", "server", ws).stderr

    csrs = []
    for site in ("site-01", "site-02"):
        result = _invoke("pki", "request", "--name", site, ws)
        assert result.exit_code == 0 and "warning" not in result.stderr, result.output
        csrs.append(ws / "sites" / site / f"{site}.csr")
    assert len({c.name for c in csrs}) == 2 and all(c.is_file() for c in csrs)

    result = _invoke("pki", "request", "--name", "site-99", ws)
    assert result.exit_code == 0, result.output
    assert "'site-99' is not one of the plan's sites" in result.stderr

    out = tmp_path / "outbox" / "deeper" / "site-01.crt"
    result = _invoke("pki", "sign", ws, csrs[0], "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (ws / "pki" / "issued" / "site-01.crt").read_bytes()

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    result = _invoke("pki", "sign", ws, csrs[1], "--out", blocker / "site-02.crt")
    assert result.exit_code == 10 and "nothing was signed" in result.stderr, result.output
    assert not (ws / "pki" / "issued" / "site-02.crt").exists()
    result = _invoke("pki", "sign", ws, csrs[1], "--out", tmp_path / "outbox")
    assert result.exit_code == 10 and "is a folder" in result.stderr, result.output
    assert not (ws / "pki" / "issued" / "site-02.crt").exists()
