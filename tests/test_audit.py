"""A site's audit log: real files, real P-256 keys from the project's own PKI code, and
every way of tampering with the log that verify() must name."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedloom.cli.main import app
from fedloom.core.errors import AuditError, CertificateError
from fedloom.pki import init_ca
from fedloom.pki.common import site_state_dir
from fedloom.privacy import signing
from fedloom.privacy.audit import AuditLog, PayloadHasher
from fedloom.privacy.audit_records import (
    AUDIT_LOG,
    GENESIS,
    RECEIPTS,
    AuditReceipt,
    read_records,
    record_hash,
)
from fedloom.privacy.audit_verify import verify

SITE = "site-a"


# ------------------------------------------------------------------ helpers


def aggregator_identity(pki_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    init_ca(pki_dir, federation="audit-test")
    key = serialization.load_pem_private_key((pki_dir / "aggregator.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate((pki_dir / "aggregator.crt").read_bytes())
    return key, cert


def write_log(state: Path, n: int = 10, key: ec.EllipticCurvePrivateKey | None = None) -> AuditLog:
    """``n`` records, two per round; with ``key``, a signed receipt for each."""
    log = AuditLog(state / AUDIT_LOG)
    for i in range(n):
        payload = PayloadHasher()
        for chunk in (b"w" * 1000, memoryview(b"b" * 24)):
            payload.update(chunk)
        record = log.append(
            round=i // 2 + 1,
            attempt_id=f"t{i // 2 + 1}.1",
            kind="update" if i % 2 else "evaluation",
            tensors=[("dense.w", "float32", (10, 25)), ("dense.b", "float32", (6,))],
            sha256=payload.hexdigest,
            nbytes=payload.nbytes,
            metrics={"loss": 0.5 / (i + 1), "accuracy": 0.1 * i},
            privacy={"dp": {"clip": 1.0, "noise_multiplier": 1.1}, "secure_aggregation": True},
        )
        if key is not None:
            log.add_receipt(
                receipt_for(key, record.seq, record.hash, record.round, record.attempt_id)
            )
    return log


def receipt_for(
    key: ec.EllipticCurvePrivateKey, seq: int, digest: str, round: int, attempt_id: str
) -> AuditReceipt:
    message = signing.receipt_message(SITE, attempt_id, digest)
    return AuditReceipt(seq, digest, round, attempt_id, signing.sign(key, message).hex())


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def rewrite(path: Path, new_lines: list[str]) -> None:
    path.write_text("".join(new_lines))


def problems(state: Path, cert: x509.Certificate | None = None) -> tuple[str, ...]:
    check = None
    if cert is not None:

        def check(r: AuditReceipt) -> bool:
            message = signing.receipt_message(SITE, r.attempt_id, r.record_hash)
            return signing.verify(cert, message, bytes.fromhex(r.signature))

    return verify(state / AUDIT_LOG, state / RECEIPTS, check).problems


@pytest.fixture
def identity(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return aggregator_identity(tmp_path / "pki")


# ------------------------------------------------------------------ writing


def test_intact_log_verifies(tmp_path: Path, identity) -> None:
    key, cert = identity
    write_log(tmp_path, key=key)
    report = verify(tmp_path / AUDIT_LOG, tmp_path / RECEIPTS, None)
    assert report.ok and (report.records, report.receipts) == (10, 10)
    assert problems(tmp_path, cert) == ()

    records = read_records(tmp_path / AUDIT_LOG)
    assert [r["seq"] for r in records] == list(range(1, 11))
    first = records[0]
    assert first["prev"] == GENESIS and records[1]["prev"] == first["hash"]
    assert first["hash"] == record_hash(first)
    assert first["sha256"] == hashlib.sha256(b"w" * 1000 + b"b" * 24).hexdigest()
    assert first["bytes"] == 1024
    assert first["tensors"][0] == {"name": "dense.w", "dtype": "float32", "shape": [10, 25]}
    assert dt.datetime.fromisoformat(first["time"]).utcoffset() == dt.timedelta(0)
    assert first["privacy"]["dp"]["noise_multiplier"] == 1.1
    if os.name == "posix":
        assert stat.S_IMODE((tmp_path / AUDIT_LOG).stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / RECEIPTS).stat().st_mode) == 0o600


def test_a_log_written_before_protocol_6_still_verifies(tmp_path: Path, identity) -> None:
    """Its records and receipts name the attempt ``task_id``: the chain, the hashes and
    the receipts' signatures all still check, and an edit in one is still found."""
    key, cert = identity
    write_log(tmp_path)
    prev, old_records, old_receipts = GENESIS, [], []
    for record in read_records(tmp_path / AUDIT_LOG):
        old = {("task_id" if k == "attempt_id" else k): v for k, v in record.items()}
        old["prev"] = prev
        old["hash"] = prev = record_hash(old)
        old_records.append(json.dumps(old) + "\n")
        receipt = receipt_for(key, old["seq"], old["hash"], old["round"], old["task_id"])
        legacy = {("task_id" if k == "attempt_id" else k): v for k, v in receipt.as_json().items()}
        old_receipts.append(json.dumps(legacy) + "\n")
    rewrite(tmp_path / AUDIT_LOG, old_records)
    rewrite(tmp_path / RECEIPTS, old_receipts)
    report = verify(tmp_path / AUDIT_LOG, tmp_path / RECEIPTS, None)
    assert report.ok and (report.records, report.receipts) == (10, 10)
    assert problems(tmp_path, cert) == ()
    edited = old_records[:]
    edited[3] = edited[3].replace('"task_id": "t2.1"', '"task_id": "t9.1"')
    rewrite(tmp_path / AUDIT_LOG, edited)
    assert "line 4 (seq 4): its content does not match its hash" in problems(tmp_path, cert)[0]


def test_record_matches_what_append_returned(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "new" / "state" / AUDIT_LOG)  # folders made on first append
    record = log.append(
        round=3, attempt_id="t3.1", kind="failure", sha256="ab" * 32, nbytes=0, metrics=None
    )
    assert read_records(log.path) == [record.as_json()]
    assert record.seq == 1 and record.tensors == () and record.metrics == {}


def test_non_finite_metrics_are_kept_as_strings(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / AUDIT_LOG)
    log.append(
        round=1,
        attempt_id="t",
        kind="update",
        sha256="00" * 32,
        nbytes=1,
        metrics={"loss": float("nan"), "gain": float("inf")},
    )
    assert read_records(log.path)[0]["metrics"] == {"loss": "NaN", "gain": "Infinity"}
    assert verify(log.path, tmp_path / RECEIPTS).ok


def test_chain_continues_across_reopening(tmp_path: Path) -> None:
    write_log(tmp_path, n=3)
    log = AuditLog(tmp_path / AUDIT_LOG)
    record = log.append(round=9, attempt_id="t9.1", kind="update", sha256="cd" * 32, nbytes=5)
    records = read_records(tmp_path / AUDIT_LOG)
    assert record.seq == 4 and record.prev == records[2]["hash"]
    assert verify(tmp_path / AUDIT_LOG, tmp_path / RECEIPTS).ok


def test_a_last_record_without_its_newline_is_completed(tmp_path: Path) -> None:
    write_log(tmp_path, n=2)
    path = tmp_path / AUDIT_LOG
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    AuditLog(path).append(round=2, attempt_id="t", kind="update", sha256="ee" * 32, nbytes=1)
    assert len(lines(path)) == 3 and verify(path, tmp_path / RECEIPTS).ok


def test_appends_from_threads_keep_one_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / AUDIT_LOG)

    def send(worker: int) -> None:
        for i in range(10):
            log.append(round=i, attempt_id=f"w{worker}", kind="update", sha256="aa" * 32, nbytes=i)

    threads = [threading.Thread(target=send, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = verify(log.path, tmp_path / RECEIPTS)
    assert report.ok and report.records == 40


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text: text[: len(text) - 40], "its last line (3) is not a JSON record"),
        (
            lambda text: text.replace('"round":2', '"round":7'),
            "its last record (line 3, seq 3) does not match its hash",
        ),
    ],
)
def test_refuses_to_append_to_a_damaged_log(tmp_path: Path, damage, message: str) -> None:
    write_log(tmp_path, n=3)
    path = tmp_path / AUDIT_LOG
    path.write_text(damage(path.read_text()))
    before = path.read_bytes()
    with pytest.raises(AuditError) as err:
        AuditLog(path)
    assert message in str(err.value) and "fedloom audit verify" in str(err.value)
    assert path.read_bytes() == before


def test_payload_hasher_counts_every_part() -> None:
    hasher = PayloadHasher()
    assert hasher.nbytes == 0 and hasher.hexdigest == hashlib.sha256().hexdigest()
    parts = [b"abc", bytearray(b"de"), memoryview(b"xyz" * 100)[10:20]]
    for part in parts:
        hasher.update(part)
    joined = b"".join(bytes(p) for p in parts)
    assert hasher.nbytes == len(joined) == 15
    assert hasher.hexdigest == hashlib.sha256(joined).hexdigest()


# ------------------------------------------------------------------ tampering


def test_an_edited_field_names_its_line(tmp_path: Path) -> None:
    write_log(tmp_path)
    path = tmp_path / AUDIT_LOG
    rows = lines(path)
    record = json.loads(rows[4])
    record["metrics"]["accuracy"] = 0.99
    rows[4] = json.dumps(record) + "\n"
    rewrite(path, rows)
    assert problems(tmp_path) == (
        "line 5 (seq 5): its content does not match its hash: the record was edited",
    )


def test_an_edited_and_rehashed_record_breaks_the_next_link_and_its_receipt(
    tmp_path: Path, identity
) -> None:
    key, cert = identity
    write_log(tmp_path, key=key)
    path = tmp_path / AUDIT_LOG
    rows = lines(path)
    record = json.loads(rows[4])
    record["bytes"] = 1
    record["hash"] = record_hash(record)
    rows[4] = json.dumps(record) + "\n"
    rewrite(path, rows)
    found = problems(tmp_path, cert)
    assert found[0].startswith("line 6 (seq 6): its prev hash does not match line 5 (seq 5)")
    assert found[1] == (
        "receipt for seq 5: the log's record 5 has another hash: it was edited or replaced"
    )
    assert len(found) == 2


def test_a_deleted_middle_record(tmp_path: Path) -> None:
    write_log(tmp_path)
    path = tmp_path / AUDIT_LOG
    rows = lines(path)
    del rows[5]
    rewrite(path, rows)
    assert problems(tmp_path) == ("line 6: seq 7 follows seq 5: record 6 was deleted",)


def test_two_deleted_records(tmp_path: Path) -> None:
    write_log(tmp_path)
    path = tmp_path / AUDIT_LOG
    rows = lines(path)
    del rows[5:7]
    rewrite(path, rows)
    assert problems(tmp_path) == ("line 6: seq 8 follows seq 5: records 6-7 were deleted",)


def test_deleted_first_records(tmp_path: Path) -> None:
    write_log(tmp_path)
    path = tmp_path / AUDIT_LOG
    rewrite(path, lines(path)[2:])
    assert problems(tmp_path) == (
        "line 1 (seq 3): the log starts at seq 3: records 1-2 were deleted",
    )


def test_swapped_records(tmp_path: Path) -> None:
    write_log(tmp_path)
    path = tmp_path / AUDIT_LOG
    rows = lines(path)
    rows[3], rows[4] = rows[4], rows[3]
    rewrite(path, rows)
    assert problems(tmp_path) == (
        "line 5 (seq 4) comes after line 4 (seq 5): the records were reordered",
    )


def test_a_record_moved_to_the_end(tmp_path: Path) -> None:
    write_log(tmp_path)
    path = tmp_path / AUDIT_LOG
    rows = lines(path)
    rows.append(rows.pop(1))
    rewrite(path, rows)
    assert problems(tmp_path) == (
        "line 10 (seq 2) comes after line 9 (seq 10): the records were reordered",
    )


def test_renumbered_records_after_a_deletion(tmp_path: Path) -> None:
    """Deleting record 4 and renumbering (with fresh hashes) the rest still breaks the
    link from the first renumbered record to record 3."""
    write_log(tmp_path, n=6)
    path = tmp_path / AUDIT_LOG
    rows = [json.loads(r) for r in lines(path)]
    del rows[3]
    for record in rows[3:]:
        record["seq"] -= 1
        record["hash"] = record_hash(record)
    rewrite(path, [json.dumps(r) + "\n" for r in rows])
    found = problems(tmp_path)
    assert found[0].startswith("line 4 (seq 4): its prev hash does not match line 3 (seq 3)")


def test_newest_records_deleted_shown_by_receipts(tmp_path: Path, identity) -> None:
    key, cert = identity
    write_log(tmp_path, key=key)
    path = tmp_path / AUDIT_LOG
    rewrite(path, lines(path)[:8])
    assert verify(path, tmp_path / "no-receipts.jsonl").ok  # the chain alone cannot tell
    assert problems(tmp_path, cert) == (
        "receipt for seq 9 (round 5): the log ends at seq 8: the newest records were deleted",
        "receipt for seq 10 (round 5): the log ends at seq 8: the newest records were deleted",
    )


def test_last_line_cut_off_while_written(tmp_path: Path) -> None:
    write_log(tmp_path)
    path = tmp_path / AUDIT_LOG
    text = path.read_text()
    path.write_text(text[: len(text) - 60])
    assert problems(tmp_path) == ("line 10: not a JSON record (cut off while written?)",)


def test_receipt_with_a_bad_signature(tmp_path: Path, identity) -> None:
    key, cert = identity
    write_log(tmp_path, n=4, key=key)
    path = tmp_path / RECEIPTS
    rows = [json.loads(r) for r in lines(path)]
    other = ec.generate_private_key(ec.SECP256R1())
    rows[2]["signature"] = signing.sign(
        other, signing.receipt_message(SITE, rows[2]["attempt_id"], rows[2]["record_hash"])
    ).hex()
    rewrite(path, [json.dumps(r) + "\n" for r in rows])
    assert problems(tmp_path, cert) == (
        "receipt for seq 3: the aggregator's signature does not verify",
    )


def test_a_receipt_for_another_site_does_not_verify(tmp_path: Path, identity) -> None:
    key, cert = identity
    log = write_log(tmp_path, n=2)
    record = read_records(log.path)[1]
    message = signing.receipt_message("site-b", record["attempt_id"], record["hash"])
    log.add_receipt(
        AuditReceipt(2, record["hash"], 1, record["attempt_id"], signing.sign(key, message).hex())
    )
    assert problems(tmp_path, cert) == (
        "receipt for seq 2: the aggregator's signature does not verify",
    )


def test_several_problems_are_listed_in_file_order(tmp_path: Path) -> None:
    write_log(tmp_path)
    path = tmp_path / AUDIT_LOG
    rows = lines(path)
    rows[1] = rows[1].replace('"kind":"update"', '"kind":"evaluation"')
    del rows[6]
    rows[-1] = rows[-1][:30]
    rewrite(path, rows)
    assert problems(tmp_path) == (
        "line 2 (seq 2): its content does not match its hash: the record was edited",
        "line 7: seq 8 follows seq 6: record 7 was deleted",
        "line 9: not a JSON record (cut off while written?)",
    )


def test_a_missing_log_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="does not exist"):
        verify(tmp_path / AUDIT_LOG, tmp_path / RECEIPTS)


# ------------------------------------------------------------------ signing


def test_sign_and_verify(identity) -> None:
    key, cert = identity
    message = signing.receipt_message(SITE, "t1.1", "ab" * 32)
    assert message == b"fedloom-receipt-v1\0site-a\0t1.1\0" + b"ab" * 32
    signature = signing.sign(key, message)
    assert signing.verify(cert, message, signature)
    assert not signing.verify(cert, message + b"x", signature)
    assert not signing.verify(cert, message, b"not a signature")


def test_model_message_is_domain_separated() -> None:
    digest = hashlib.sha256(b"specs").digest()
    message = signing.model_message("t2.1", 2, digest, digest)
    assert message.startswith(b"fedloom-model-v1\0t2.1\0")
    assert message != signing.model_message("t2.1", 3, digest, digest)
    with pytest.raises(ValueError):
        signing.model_message("t2.1", 2, b"short", digest)


def test_certificate_from_pem(tmp_path: Path) -> None:
    aggregator_identity(tmp_path / "ours")
    aggregator_identity(tmp_path / "theirs")
    ours = x509.load_pem_x509_certificate((tmp_path / "ours" / "ca.crt").read_bytes())
    pem = (tmp_path / "ours" / "aggregator.crt").read_bytes()
    assert signing.certificate_from_pem(pem, ours).subject.rfc4514_string()
    foreign = (tmp_path / "theirs" / "aggregator.crt").read_bytes()
    with pytest.raises(CertificateError, match="not issued by the federation's CA"):
        signing.certificate_from_pem(foreign, ours)


def test_certificate_from_pem_refuses_an_expired_one(tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)

    def certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(then)
            .not_valid_after(then + dt.timedelta(days=(3650 if subject == name else 1)))
            .sign(ca_key, hashes.SHA256())
        )

    ca = certificate(name, ca_key)
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aggregator")])
    leaf = certificate(leaf_name, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CertificateError, match="not valid now"):
        signing.certificate_from_pem(leaf.public_bytes(serialization.Encoding.PEM), ca)


# ------------------------------------------------------------------ CLI


def invoke(*args: object):
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A workspace whose site holds a log with receipts, the CA and aggregator.crt."""
    key, _ = aggregator_identity(tmp_path / "pki")
    state = site_state_dir(tmp_path, SITE)
    state.mkdir(parents=True)
    for name in ("ca.crt", "aggregator.crt"):
        (state / name).write_bytes((tmp_path / "pki" / name).read_bytes())
    write_log(state, n=6, key=key)
    return tmp_path


def test_cli_verify_intact(site: Path) -> None:
    result = invoke("audit", "verify", site, "--name", SITE)
    assert result.exit_code == 0, result.output
    assert "audit log intact: 6 records, 6 receipts" in result.output
    assert "receipts' signatures checked with" in result.output


def test_cli_verify_lists_every_problem(site: Path) -> None:
    path = site_state_dir(site, SITE) / AUDIT_LOG
    rows = lines(path)
    rows[1] = rows[1].replace('"round":1', '"round":2')
    rewrite(path, rows[:5])
    result = invoke("audit", "verify", site, "--name", SITE)
    assert result.exit_code == 13
    assert "not intact: 2 problems" in result.stderr
    assert "line 2 (seq 2): its content does not match its hash" in result.stderr
    assert "receipt for seq 6 (round 3): the log ends at seq 5" in result.stderr
    assert "Traceback" not in result.output


def test_cli_verify_with_another_aggregator_cert(site: Path, tmp_path: Path) -> None:
    aggregator_identity(tmp_path / "other")
    result = invoke(
        "audit",
        "verify",
        site,
        "--name",
        SITE,
        "--aggregator-cert",
        tmp_path / "other" / "aggregator.crt",
    )
    assert result.exit_code == 10 and "was not issued by the federation's CA" in result.stderr
    (site_state_dir(site, SITE) / "ca.crt").unlink()  # no CA to check it against
    result = invoke(
        "audit",
        "verify",
        site,
        "--name",
        SITE,
        "--aggregator-cert",
        tmp_path / "other" / "aggregator.crt",
    )
    assert result.exit_code == 13
    assert result.stderr.count("the aggregator's signature does not verify") == 6


def test_cli_show(site: Path) -> None:
    result = invoke("audit", "show", site, "--name", SITE)
    assert result.exit_code == 0, result.output
    assert "2 tensors, 1.0 KB" in result.output
    assert "dp.clip=1.0, dp.noise_multiplier=1.1, secure_aggregation=true" in result.output
    assert "6 records, 6.1 KB sent" in result.output

    result = invoke("audit", "show", site, "--name", SITE, "--round", 2, "--json")
    assert result.exit_code == 0, result.output
    shown = [json.loads(line) for line in result.output.splitlines()]
    assert [r["seq"] for r in shown] == [3, 4] and all(r["round"] == 2 for r in shown)


def test_cli_show_without_a_log(tmp_path: Path) -> None:
    result = invoke("audit", "show", tmp_path, "--name", SITE)
    assert result.exit_code == 13 and "does not exist" in result.stderr
