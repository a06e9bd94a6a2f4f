"""``fedloom pki``: the federation's CA in the workspace, keys made and kept by sites.

The CA side runs ``init``, ``sign``, ``revoke``, ``list`` and ``server``; each site
runs ``request`` and ``accept``. Site keys never leave the site's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.box import SIMPLE_HEAD
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

from fedloom.cli.common import console, friendly, site_name, warn
from fedloom.core.errors import CertificateError, FedloomError

# The PKI (cryptography) and the plan (pydantic) are imported by each command as it
# runs: `fedloom --help` stays light.
CA_DAYS = 3650  # fedloom.pki.authority.CA_DAYS (tests/test_cli.py checks they agree)


pki_app = typer.Typer(
    help="The federation's certificates: a CA in the workspace, keys kept by the sites.",
    no_args_is_help=True,
)

WorkspaceArg = Annotated[
    Path, typer.Argument(help="Workspace folder holding federation.yaml; its CA is in pki/.")
]
SiteWorkspaceArg = Annotated[
    Path, typer.Argument(help="Workspace folder; the site's state defaults to sites/NAME in it.")
]
Hosts = Annotated[
    list[str] | None,
    typer.Option(
        "--host",
        help="A DNS name or IP address sites use to reach the aggregator (repeatable).",
    ),
]
Days = Annotated[int, typer.Option(help="How many days the certificate is valid.")]
SiteName = Annotated[
    str,
    typer.Option("--name", help="The site's name, as in the plan's sites.", callback=site_name),
]
StateDir = Annotated[
    Path | None,
    typer.Option("--state", help="The site's state folder (default: WORKSPACE/sites/NAME)."),
]

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@pki_app.command("init")
@friendly
def init(
    workspace: WorkspaceArg,
    host: Hosts = None,
    days: Annotated[int, typer.Option(help="Days the aggregator's certificate is valid.")] = 825,
    ca_days: Annotated[int, typer.Option(help="Days the CA certificate is valid.")] = CA_DAYS,
    force: Annotated[
        bool, typer.Option(help="Replace an existing CA: every certificate issued stops working.")
    ] = False,
) -> None:
    """Create the federation's CA in WORKSPACE/pki, and the aggregator's certificate."""
    from fedloom.pki import init_ca, server_hosts
    from fedloom.pki.common import CA_CERT, CRL_FILE, SERVER_CERT, SERVER_KEY, pki_dir_of
    from fedloom.plan import load_plan

    plan = load_plan(workspace, [])
    pki_dir = pki_dir_of(workspace)
    hosts = host or DEFAULT_HOSTS
    if not host:
        warn(
            "no --host given: the aggregator's certificate names only "
            f"{' and '.join(DEFAULT_HOSTS)}, so sites on other machines will fail the "
            "host-name check; give the name or address sites use, e.g. --host agg.example.org "
            f"(now or later with `fedloom pki server {workspace} --host ...`)"
        )
    ca = init_ca(
        pki_dir, federation=plan.name, hosts=hosts, days=days, ca_days=ca_days, force=force
    )
    console.print(f"Created the CA of federation [bold]{plan.name}[/] in [bold]{pki_dir}[/]")
    console.print(f"  CA certificate     {pki_dir / CA_CERT}  (give it to every site)")
    console.print(f"  CA key             {pki_dir / 'ca.key'}  (keep it secret: mode 0600)")
    console.print(f"  revocation list    {pki_dir / CRL_FILE}")
    console.print(f"  aggregator         {pki_dir / SERVER_CERT}, {pki_dir / SERVER_KEY}")
    _show("CA fingerprint", ca.fingerprint)
    console.print(f"The aggregator's certificate is valid for: {', '.join(server_hosts(pki_dir))}")
    console.print(
        "Next: each site runs [cyan]fedloom pki request --name SITE[/] and sends you its "
        f"SITE.csr; you run [cyan]fedloom pki sign {workspace} SITE.csr[/]"
    )


@pki_app.command("server")
@friendly
def server(workspace: WorkspaceArg, host: Hosts = None, days: Days = 825) -> None:
    """Issue the aggregator's server certificate again (new hosts, or renewal)."""
    from fedloom.pki import issue_server_cert, server_hosts
    from fedloom.pki.common import SERVER_CERT, pki_dir_of

    pki_dir = pki_dir_of(workspace)
    hosts = host or list(server_hosts(pki_dir))
    info = issue_server_cert(pki_dir, hosts, days=days)
    console.print(f"Issued the aggregator's certificate {pki_dir / SERVER_CERT} with a new key")
    console.print(f"valid for: {', '.join(server_hosts(pki_dir))}")
    console.print(f"valid until {info.not_after:%Y-%m-%d}")
    _show("fingerprint", info.fingerprint)
    console.print("Restart the aggregator to use it.")


@pki_app.command("request")
@friendly
def request(
    name: SiteName, workspace: SiteWorkspaceArg = Path("."), state: StateDir = None
) -> None:
    """At a site: make its key (which stays here) and a certificate signing request."""
    from fedloom.pki import request_certificate
    from fedloom.pki.common import site_state_dir

    state_dir = state or site_state_dir(workspace, name)
    roster = _roster_if_any(workspace)
    if roster is not None and name not in roster:
        warn(
            f"{name!r} is not one of the plan's sites ({', '.join(roster)}): the CA will "
            "refuse to sign this request; check --name against the plan's sites"
        )
    csr_path, key_fp = request_certificate(state_dir, name)
    console.print(f"Signing request for [bold]{name}[/]: [bold]{csr_path}[/]")
    _show("key fingerprint", key_fp)
    console.print(
        f"Send {csr_path.name} to the federation's CA; the key stays here "
        f"({state_dir / 'site.key'})."
    )


@pki_app.command("sign")
@friendly
def sign(
    workspace: WorkspaceArg,
    csr: Annotated[Path, typer.Argument(help="The site's SITE.csr.")],
    out: Annotated[
        Path | None, typer.Option(help="Also write the certificate to this file.")
    ] = None,
    days: Days = 825,
) -> None:
    """At the CA: sign a site's request, if the site is in the plan."""
    from fedloom.pki import key_fingerprint, sign_request
    from fedloom.pki.common import CA_CERT, ISSUED_DIR, pki_dir_of, read_file, write_atomic
    from fedloom.plan import load_plan

    roster = load_plan(workspace, []).roster
    csr_pem = read_file(csr, missing_hint="pass the SITE.csr file the site sent you")
    pki_dir = pki_dir_of(workspace)
    if out is not None:  # before anything is issued: a second signing makes a second serial
        _writable_folder(out)
    cert_pem, info = sign_request(pki_dir, csr_pem, allowed=roster, days=days)
    written = [pki_dir / ISSUED_DIR / f"{info.name}.crt"]
    if out is not None:
        write_atomic(out, cert_pem)
        written.append(out)
    console.print(f"Signed the certificate of [bold]{info.name}[/] (serial {info.serial:x})")
    console.print(f"written to {', '.join(str(p) for p in written)}")
    console.print(f"valid until {info.not_after:%Y-%m-%d}")
    _show("site's key fingerprint", key_fingerprint(csr_pem))
    _show("certificate fingerprint", info.fingerprint)
    console.print(
        f"Send the certificate and {pki_dir / CA_CERT} to the site, and read the certificate "
        "fingerprint to it over another channel (the phone) to compare with what "
        "`fedloom pki accept` prints."
    )


@pki_app.command("accept")
@friendly
def accept(
    name: SiteName,
    cert: Annotated[Path, typer.Option(help="The certificate the CA signed.")],
    ca: Annotated[Path, typer.Option(help="The federation's ca.crt.")],
    workspace: SiteWorkspaceArg = Path("."),
    state: StateDir = None,
) -> None:
    """At a site: install the certificate the CA signed, after checking it."""
    from fedloom.pki import accept_certificate, fingerprint, peer_identity
    from fedloom.pki.common import read_file, site_state_dir

    state_dir = state or site_state_dir(workspace, name)
    cert_pem = read_file(cert, missing_hint="pass the certificate the CA sent you")
    ca_pem = read_file(ca, missing_hint="pass the ca.crt the CA sent you")
    issued_to, _ = peer_identity(cert_pem)
    if issued_to != name:
        raise CertificateError(
            f"{cert} is the certificate of {issued_to!r}, not of {name!r}",
            hint="pass this site's certificate, or the right --name",
        )
    info = accept_certificate(state_dir, cert_pem, ca_pem)
    console.print(f"Installed the certificate of [bold]{info.name}[/] in [bold]{state_dir}[/]")
    console.print(f"valid until {info.not_after:%Y-%m-%d}")
    _show("certificate fingerprint", info.fingerprint)
    _show("CA fingerprint", fingerprint(ca_pem))
    console.print("Compare the certificate fingerprint with the one the CA read to you.")


@pki_app.command("revoke")
@friendly
def revoke_site(
    workspace: WorkspaceArg,
    name: Annotated[
        str, typer.Argument(help="The site whose certificate to revoke.", callback=site_name)
    ],
) -> None:
    """At the CA: revoke a site's certificate."""
    from fedloom.pki import revoke
    from fedloom.pki.common import CRL_FILE, pki_dir_of

    pki_dir = pki_dir_of(workspace)
    crl_path = pki_dir / CRL_FILE
    before = crl_path.read_bytes() if crl_path.is_file() else b""
    info = revoke(pki_dir, name)
    if crl_path.read_bytes() == before:
        console.print(
            f"The certificate of [bold]{name}[/] (serial {info.serial:x}) was already revoked"
        )
        return
    console.print(f"Revoked the certificate of [bold]{name}[/] (serial {info.serial:x})")
    console.print(
        f"{crl_path} is updated; a running aggregator refuses {name} from its next "
        "call, without a restart."
    )


@pki_app.command("list")
@friendly
def list_certificates(workspace: WorkspaceArg) -> None:
    """List the certificates issued to sites, with their expiry and revocation."""
    from fedloom.pki import RevocationList, fingerprint, issued_certificates, server_hosts
    from fedloom.pki.common import CA_CERT, CRL_FILE, pki_dir_of, read_file
    from fedloom.pki.common import now as current_time

    pki_dir = pki_dir_of(workspace)
    ca_pem = read_file(pki_dir / CA_CERT, missing_hint="run `fedloom pki init WORKSPACE`")
    crl = RevocationList(pki_dir / CRL_FILE, ca_pem)
    now = current_time()
    _show("CA fingerprint", fingerprint(ca_pem))
    console.print(f"aggregator: {', '.join(server_hosts(pki_dir))}")
    serial = Column("serial", overflow="fold")  # whole, even when folded: the CRL lists it
    table = Table("name", serial, "fingerprint (SHA256)", "expires", "revoked", box=SIMPLE_HEAD)
    for info in issued_certificates(pki_dir):
        table.add_row(
            info.name,
            f"{info.serial:x}",
            Text(info.fingerprint.removeprefix("SHA256:")[:17] + "…"),  # Text: no :CD: emoji
            f"{info.not_after:%Y-%m-%d}" + (" (expired)" if info.not_after < now else ""),
            "yes" if crl.is_revoked(info.serial) else "no",
        )
    console.print(table)


def _roster_if_any(workspace: Path) -> tuple[str, ...] | None:
    """The plan's sites when WORKSPACE holds a plan that loads; None otherwise (a site
    may request its certificate before it has the workspace)."""
    from fedloom.plan import PLAN_FILE, load_plan

    if not (workspace / PLAN_FILE).is_file():
        return None
    try:
        return load_plan(workspace, []).roster
    except FedloomError:
        return None


def _writable_folder(out: Path) -> None:
    """Create ``out``'s folder if it is missing; refuse a path that cannot be written."""
    if out.is_dir():
        raise CertificateError(
            f"--out {out} is a folder", hint="give a file name, e.g. --out outbox/SITE.crt"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CertificateError(
            f"cannot create the folder of --out {out}: {err.strerror or err}",
            hint="choose a folder you can write to; nothing was signed",
        ) from err


def _show(label: str, value: str) -> None:
    """A label and a long value (a fingerprint) on one line that is never wrapped."""
    console.print(
        f"{label}: [cyan]{escape(value)}[/]", soft_wrap=True, highlight=False, emoji=False
    )
