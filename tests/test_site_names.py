"""One rule for site names, applied by the plan and by every command that takes a site
name, before anything touches the disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from workspaces import make_workspace, run_cli

from fedloom import PlanError
from fedloom.core.errors import CertificateError
from fedloom.core.site_name import MAX_SITE_NAME, site_name_problem
from fedloom.pki.authority import init_ca
from fedloom.pki.common import site_state_dir
from fedloom.pki.issued import sign_request
from fedloom.plan import validate_plan

GOOD = ["site-01", "a", "7", "Hospital_A", "lab.eu-west", "a..b", "x" * MAX_SITE_NAME]
BAD = [
    "",
    ".",
    "..",
    "../x",
    "../../../x",
    "a/b",
    "a\\b",
    "-rf",
    "_x",
    ".hidden",
    "site.",
    "site a",
    "site\n01",
    "ｓｉｔｅ-01",  # full-width look-alikes  # noqa: RUF001
    "site-０1",  # a full-width digit  # noqa: RUF001
    "sité",
    "con",
    "NUL.txt",
    "x" * (MAX_SITE_NAME + 1),
]


@pytest.mark.parametrize("name", GOOD)
def test_a_good_site_name_passes(name: str) -> None:
    assert site_name_problem(name) is None
    assert validate_plan({"sites": [name]}).roster == (name,)


@pytest.mark.parametrize("name", BAD)
def test_a_bad_site_name_is_refused_by_the_rule_the_plan_and_the_state_folder(
    name: str, tmp_path: Path
) -> None:
    problem = site_name_problem(name)
    assert problem is not None and "cannot name a site" in problem
    with pytest.raises(PlanError) as caught:
        validate_plan({"sites": ["site-01", name]})
    assert caught.value.problems[0].startswith("sites: ")
    assert "cannot name a site" in caught.value.problems[0]
    with pytest.raises(CertificateError, match="cannot name a site"):
        site_state_dir(tmp_path, name)


def test_the_plan_refuses_names_that_differ_only_in_case() -> None:
    with pytest.raises(PlanError, match=r"more than case.*\['Site-A', 'site-a'\]"):
        validate_plan({"sites": ["site-a", "Site-A", "site-b"]})


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.process
@pytest.mark.parametrize(
    "args",
    [
        ("collaborator", "start", "{ws}", "--name", "../../../x", "--give-up-after", "1"),
        ("collaborator", "start", "{ws}", "--name", "..", "--give-up-after", "1"),
        ("collaborator", "start", "{ws}", "--name", "-rf", "--give-up-after", "1"),
        ("pki", "request", "{ws}", "--name", "../escaped"),
        ("pki", "request", "{ws}", "--name", "."),
        ("pki", "accept", "{ws}", "--name", "..", "--cert", "{ws}/federation.yaml"),
        ("pki", "revoke", "{ws}", "../x"),
        ("audit", "show", "{ws}", "--name", "../x"),
        ("audit", "verify", "{ws}", "--name", "ｓｉｔｅ"),  # noqa: RUF001
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_command_refuses_a_bad_site_name_before_it_touches_the_disk(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    root = tmp_path / "deep" / "er" / "still"
    ws = make_workspace(root, "breast-cancer")
    before = _tree(tmp_path)
    proc = run_cli(*(a.replace("{ws}", str(ws)) for a in args), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot name a site" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _tree(tmp_path) == before  # nothing made, inside the workspace or out


@pytest.mark.parametrize("name", ["..", "-rf", "ｓｉｔｅ-01", "site."])  # noqa: RUF001
def test_the_ca_refuses_a_signing_request_for_a_bad_name(tmp_path: Path, name: str) -> None:
    """A hostile site crafts its own request; the CA checks the name before it writes."""
    pki_dir = tmp_path / "pki"
    init_ca(pki_dir, federation="fed", hosts=["localhost"])
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    before = _tree(tmp_path)
    with pytest.raises(CertificateError, match="cannot name a site"):
        sign_request(pki_dir, csr.public_bytes(serialization.Encoding.PEM), allowed=[name])
    assert _tree(tmp_path) == before
