"""``fedloom audit``: a site's record of everything that left it, and proof it is intact.

``show`` and ``verify`` read the site's state folder (``STATE/audit.jsonl`` and
``STATE/receipts.jsonl``) without writing it, so they are safe beside a running
collaborator; ``model`` checks the final model a site kept (``STATE/final``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Column, Table

from fedloom.cli.common import console, count, friendly, human_bytes, site_name
from fedloom.core.errors import AuditError, CertificateError

# cryptography and the audit log's modules are imported by each command as it runs:
# `fedloom --help` stays light.
if TYPE_CHECKING:
    from fedloom.privacy.audit_records import AuditReceipt

audit_app = typer.Typer(
    help="A site's audit log: what left the site, and proof that the log is intact.",
    no_args_is_help=True,
)

SiteWorkspaceArg = Annotated[
    Path, typer.Argument(help="Workspace folder; the site's state defaults to sites/NAME in it.")
]
SiteName = Annotated[
    str,
    typer.Option("--name", help="The site's name, as in the plan's sites.", callback=site_name),
]
StateDir = Annotated[
    Path | None,
    typer.Option("--state", help="The site's state folder (default: WORKSPACE/sites/NAME)."),
]


@audit_app.command("show")
@friendly
def show(
    name: SiteName,
    workspace: SiteWorkspaceArg = Path("."),
    state: StateDir = None,
    round_: Annotated[
        int | None, typer.Option("--round", help="Only the records of this round.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the records as JSON lines, as stored.")
    ] = False,
) -> None:
    """List what left the site: one row per message sent, oldest first.

    Shows the records as they are; `fedloom audit verify` checks that none was edited,
    reordered or deleted.
    """
    from fedloom.pki.common import site_state_dir as default_state_dir
    from fedloom.privacy.audit_records import AUDIT_LOG, read_records

    log = (state or default_state_dir(workspace, name)) / AUDIT_LOG
    records = read_records(log)
    if round_ is not None:
        records = [r for r in records if r.get("round") == round_]
    if as_json:
        for record in records:
            typer.echo(json.dumps(record, separators=(",", ":")))
        return
    if not records:
        where = "" if round_ is None else f" for round {round_}"
        console.print(f"no records{where} in {log}", highlight=False)
        return
    table = Table(
        Column("seq", no_wrap=True),
        Column("time (UTC)", min_width=10),
        Column("round", no_wrap=True),
        Column("kind", no_wrap=True),
        Column("sent", min_width=10),
        Column("sha256", no_wrap=True),
        Column("metrics", ratio=1, overflow="fold"),
        Column("privacy", ratio=2, overflow="fold"),
        title=str(log),
    )
    for r in records:
        table.add_row(
            str(r.get("seq", "?")),
            str(r.get("time", "?"))[:19].replace("T", " "),
            str(r.get("round", "?")),
            str(r.get("kind", "?")),
            _sent(r),
            str(r.get("sha256", "?"))[:8],
            ", ".join(r.get("metrics") or {}) or "-",
            _privacy(r.get("privacy") or {}) or "-",
        )
    console.print(table)
    total = sum(int(r.get("bytes", 0)) for r in records)
    console.print(
        f"{count(len(records), 'record')}, {human_bytes(total)} sent; "
        f"check the log with [cyan]fedloom audit verify {workspace} --name {name}"
        + ("" if state is None else f" --state {state}")
        + "[/]",
        highlight=False,
    )


@audit_app.command("verify")
@friendly
def verify_log(
    name: SiteName,
    workspace: SiteWorkspaceArg = Path("."),
    state: StateDir = None,
    aggregator_cert: Annotated[
        Path | None,
        typer.Option(
            "--aggregator-cert",
            help="The aggregator's certificate, to check the receipts' signatures "
            "(default: STATE/aggregator.crt when it exists).",
        ),
    ] = None,
) -> None:
    """Check that the audit log is intact: every record as written, none reordered or
    deleted, and every receipt the aggregator signed matching its record.

    Exits 0 when it is, 13 with every problem found when it is not.
    """
    from fedloom.pki.common import SERVER_CERT, fingerprint, load_cert
    from fedloom.pki.common import site_state_dir as default_state_dir
    from fedloom.privacy.audit_records import AUDIT_LOG, RECEIPTS
    from fedloom.privacy.audit_verify import verify
    from fedloom.privacy.signing import receipt_message
    from fedloom.privacy.signing import verify as verify_signature

    state_dir = state or default_state_dir(workspace, name)
    log = state_dir / AUDIT_LOG
    cert_path = aggregator_cert
    if cert_path is None and (state_dir / SERVER_CERT).exists():
        cert_path = state_dir / SERVER_CERT
    check = None
    if cert_path is not None:
        cert_pem = _aggregator_cert(cert_path, state_dir)
        cert = load_cert(cert_pem, "aggregator certificate")

        def check(receipt: AuditReceipt) -> bool:
            try:
                message = receipt_message(name, receipt.attempt_id, receipt.record_hash)
                signature = bytes.fromhex(receipt.signature)
            except ValueError:
                return False
            return verify_signature(cert, message, signature)

    report = verify(log, state_dir / RECEIPTS, check)
    if not report.ok:
        problems = "\n".join(f"  - {p}" for p in report.problems)
        raise AuditError(
            f"the audit log {log} is not intact: {count(len(report.problems), 'problem')}\n"
            f"{problems}",
            hint=f"keep {AUDIT_LOG} and {RECEIPTS} as they are, as evidence; each problem "
            "names the line to look at",
        )
    console.print(
        f"audit log intact: {count(report.records, 'record')}, {count(report.receipts, 'receipt')}",
        highlight=False,
    )
    if cert_path is not None:
        console.print(
            f"receipts' signatures checked with {cert_path} ({fingerprint(cert_pem)})",
            highlight=False,
            soft_wrap=True,
        )
    elif report.receipts:
        console.print(
            f"receipts' signatures not checked: no {SERVER_CERT} in {state_dir}; "
            "pass --aggregator-cert",
            highlight=False,
        )


@audit_app.command("model")
@friendly
def verify_model(
    path: Annotated[
        Path, typer.Argument(help="A final model a site kept: STATE/final/<run>.safetensors.")
    ],
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            help="The federation's CA certificate (default: ca.crt in the site's state "
            "folder the file is in).",
        ),
    ] = None,
) -> None:
    """Check a final model a site kept: signed by the federation's aggregator, and its
    tensors exactly those it signed.

    Exits 0 when they are, 13 saying what does not hold when not.
    """
    from fedloom.pki.common import SITE_CA, fingerprint, read_file
    from fedloom.privacy.final_model import FINAL_DIR, check_final_model

    ca_path = ca if ca is not None else path.parent.parent / SITE_CA
    if ca is None and (path.parent.name != FINAL_DIR or not ca_path.is_file()):
        raise CertificateError(
            f"no CA certificate to check {path} with: it is not in a site's "
            f"STATE/{FINAL_DIR} folder beside STATE/{SITE_CA}",
            hint="pass the federation's CA certificate with --ca",
        )
    ca_pem = read_file(ca_path, missing_hint="pass the federation's CA certificate with --ca")
    info, weights = check_final_model(path, ca_pem)
    console.print(
        f"final model intact: {count(len(weights), 'tensor')}, signed by the aggregator "
        f"({fingerprint(info.aggregator_cert)}) for task {info.attempt_id} (round {info.round})",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"plan hash {info.plan_hash}; kept by {info.site}"
        + (f" at {info.saved}" if info.saved else "")
        + f"; CA {ca_path}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _aggregator_cert(path: Path, state_dir: Path) -> bytes:
    """The aggregator certificate's PEM; checked against the site's CA when it has one
    (not against dates: old receipts stay verifiable after the certificate expires)."""
    from cryptography.exceptions import InvalidSignature

    from fedloom.pki.common import SITE_CA, load_cert, read_file

    pem = read_file(path, missing_hint="pass the aggregator.crt of the federation")
    cert = load_cert(pem, "aggregator certificate")
    ca_path = state_dir / SITE_CA
    if ca_path.exists():
        ca = load_cert(read_file(ca_path, missing_hint=""), "CA certificate")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as err:
            raise CertificateError(
                f"{path} was not issued by the federation's CA ({ca_path})",
                hint="pass the aggregator certificate the federation's CA signed",
            ) from err
    return pem


def _sent(record: dict[str, Any]) -> str:
    size = human_bytes(int(record.get("bytes", 0)))
    tensors = record.get("tensors") or []
    return f"{count(len(tensors), 'tensor')}, {size}" if tensors else size


def _privacy(params: dict[str, Any], prefix: str = "") -> str:
    """``dp.clip=1.0, secure_aggregation=true``: the parameters, flattened."""
    parts = []
    for key, value in params.items():
        if isinstance(value, dict):
            inner = _privacy(value, f"{prefix}{key}.")
            if inner:
                parts.append(inner)
        else:
            shown = value if isinstance(value, str) else json.dumps(value)
            parts.append(f"{prefix}{key}={shown}")
    return ", ".join(parts)
