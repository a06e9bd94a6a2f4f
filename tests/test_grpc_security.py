"""What the gRPC aggregator refuses, and that the federation carries on regardless.

Real mutual TLS on loopback with certificates from fedloom's own PKI; a real
Aggregator on a ManualClock; honest sites as Collaborator threads. The adversary is
a :class:`GrpcConnection` (or a raw gRPC channel) with real certificates: another CA's,
a revoked one, one the plan does not list, another site's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import attempt_id
from grpcnet import GrpcTestTransport

from fedloom.core.errors import AccessDenied, TransportError
from fedloom.core.records import CloseReason, FailureKind
from fedloom.core.weights import Weights, specs_of
from fedloom.pki import (
    accept_certificate,
    provision,
    request_certificate,
    revoke,
    sign_request,
    site_credentials,
)
from fedloom.transport import Chunk, Heartbeat, UpdateHeader, iter_chunks, serde
from fedloom.transport.grpc.client import certificate_refused
from fedloom.transport.grpc.wire import (
    NO_SESSION,
    REFUSAL_HEADER,
    SESSION_HEADER,
    channel_options,
    path,
)

pytestmark = pytest.mark.server

SITES = ("site-a", "site-b", "site-c")
SAMPLES = (10, 30, 60)


@pytest.fixture
def grpc_federation(make_grpc_federation: Any) -> Any:
    """Three sites over gRPC, two rounds, no final evaluation; 2 of 3 answers make a round."""
    return make_grpc_federation(min_fraction=0.6, rounds=2, final_evaluation=False)


def start_honest(fed: Any, runner_cls: Any, sites: tuple[str, ...] = SITES) -> None:
    for site in sites:
        index = SITES.index(site)
        fed.start_site(site, runner_cls(index, SAMPLES[index]))


@pytest.fixture
def aggregator_log(caplog: pytest.LogCaptureFixture) -> Callable[[], str]:
    """What the aggregator has logged so far (INFO and above), as text."""
    caplog.set_level(logging.INFO, logger="fedloom.aggregator")

    def read() -> str:
        return "\n".join(r.getMessage() for r in caplog.records if r.name == "fedloom.aggregator")

    return read


def test_certificate_from_another_ca_is_refused_at_the_handshake(
    grpc_federation: Any, shift_runner: Any, tmp_path: Path
) -> None:
    fed = grpc_federation
    fed.start()
    foreign = provision(tmp_path / "other-federation", ["site-a"])["site-a"]
    conn = fed.transport.connect("site-a", state=foreign, connect_seconds=60.0)
    with pytest.raises(AccessDenied, match="another CA"):
        conn.open()
    start_honest(fed, shift_runner)
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 2


def test_revoked_certificate_is_refused_and_its_site_rejoins_with_a_new_one(
    grpc_federation: Any, shift_runner: Any, aggregator_log: Callable[[], str]
) -> None:
    fed = grpc_federation
    t = fed.transport
    old_state = t.states["site-c"]
    info = revoke(t.workspace / "pki", "site-c")
    fed.start()
    with pytest.raises(AccessDenied, match="revoked"):
        t.connect("site-c", state=old_state).open()
    assert f"serial {info.serial:x}) has been revoked" in aggregator_log()

    new_state = t.workspace / "sites-renewed" / "site-c"
    csr, _ = request_certificate(new_state, "site-c")
    cert, _ = sign_request(t.workspace / "pki", csr.read_bytes(), allowed=SITES)
    accept_certificate(new_state, cert, (t.workspace / "pki" / "ca.crt").read_bytes())
    t.states["site-c"] = new_state
    start_honest(fed, shift_runner)
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 2


@pytest.mark.parametrize(
    ("who", "changes", "refusal"),
    [
        ("mallory", {}, "site 'mallory' is not in the plan's sites"),
        (
            "site-b",
            {"name": "site-a"},
            "calls itself 'site-a' but its certificate belongs to 'site-b'",
        ),
        ("site-a", {"plan_hash": "0" * 64}, "plan hash of 'site-a'"),
        ("site-a", {"protocol": 99}, "protocol version 99"),
    ],
)
def test_identity_and_plan_mismatches_are_refused_on_both_sides(
    who: str,
    changes: dict[str, Any],
    refusal: str,
    grpc_federation: Any,
    shift_runner: Any,
    aggregator_log: Callable[[], str],
) -> None:
    fed = grpc_federation
    fed.start()
    t = fed.transport
    protocol = changes.pop("protocol", None)
    conn = t.connect(who, state=t.states[who], **changes)
    if protocol is not None:
        conn.protocol_version = protocol
    with pytest.raises(AccessDenied, match=refusal.split("'")[0]) as refused:
        conn.open()
    assert refusal in str(refused.value)  # the site is told why
    assert refusal in aggregator_log()  # and the aggregator's log says it too
    start_honest(fed, shift_runner)
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 2
    named = {r.site for rec in history for r in rec.results}
    assert named == set(SITES)


def bad_upload(kind: str, round: int, weights: Weights) -> tuple[UpdateHeader, list[Chunk]]:
    delta = {k: np.ones_like(v) for k, v in weights.items()}
    header = UpdateHeader(round, 50, specs_of(delta), {"loss": 0.1}, attempt_id(round))
    chunks = list(iter_chunks(delta))
    if kind == "truncated":
        return header, chunks[:-1]
    if kind == "nan":
        delta["w"][1, 2] = np.nan
        return header, list(iter_chunks(delta))
    if kind == "wrong shape":
        delta["w"] = np.ones((4, 3), np.float32)
        return UpdateHeader(round, 50, specs_of(delta), {}, attempt_id(round)), list(
            iter_chunks(delta)
        )
    if kind == "larger than announced":
        last = chunks[0]
        return header, [Chunk(last.tensor, last.offset, bytes(last.data) + b"\0" * 8), *chunks[1:]]
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "stream ended early: tensor 'steps' has 0 of 8 bytes"),
        ("nan", "'w'"),
        ("wrong shape", "tensor 'w' float32[4, 3] does not match the global model's"),
        ("larger than announced", "larger than announced"),
    ],
)
def test_a_bad_update_is_rejected_recorded_and_the_round_goes_on(
    kind: str,
    reason: str,
    grpc_federation: Any,
    shift_runner: Any,
    tiny_weights: Weights,
    aggregator_log: Callable[[], str],
) -> None:
    fed = grpc_federation
    fed.start()
    fed.log.wait_opened(1)
    start_honest(fed, shift_runner, ("site-a", "site-b"))
    header, chunks = bad_upload(kind, 1, tiny_weights)
    receipt = fed.transport.connect("site-c").upload(header, chunks)
    assert not receipt.accepted
    assert reason in receipt.reason
    fed.log.wait_opened(2)
    fed.log.wait_answered(2, 2)
    fed.pass_deadline()  # site-c sends nothing in round 2
    history = fed.finish()
    first = history[0]
    assert first.close_reason is CloseReason.QUORUM
    assert [r.site for r in first.results] == ["site-a", "site-b"]
    (failure,) = first.failures
    assert (failure.site, failure.kind) == ("site-c", FailureKind.REJECTED)
    assert reason in failure.reason
    assert f"round 1: update from site-c rejected: {failure.reason}" in aggregator_log()
    assert history[1].close_reason is CloseReason.DEADLINE_QUORUM


def test_a_replayed_update_of_an_earlier_round_is_rejected(
    grpc_federation: Any,
    shift_runner: Any,
    tiny_weights: Weights,
    aggregator_log: Callable[[], str],
) -> None:
    fed = grpc_federation
    fed.start()
    start_honest(fed, shift_runner)
    fed.log.wait_opened(2)
    replay = shift_runner.delta_like(tiny_weights, 1, 1)  # site-b's round-1 update
    header = UpdateHeader(1, SAMPLES[1], specs_of(replay), {"loss": 0.5}, attempt_id(1))
    # site-b's own process replays it (another process would first replace its session)
    receipt = fed.transport.connect("site-b", same_process=True).upload(header, iter_chunks(replay))
    assert not receipt.accepted
    assert "round 1 is not open" in receipt.reason
    assert "round 1: update from site-b rejected: round 1 is not open" in aggregator_log()
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 2


def test_garbage_bytes_are_rejected_without_harm(grpc_federation: Any, shift_runner: Any) -> None:
    fed = grpc_federation
    fed.start()
    fed.log.wait_opened(1)
    t = fed.transport
    conn = t.connect("site-c")
    conn.open()  # a real session, then raw garbage on the Upload method
    creds = site_credentials(t.states["site-c"])
    channel = grpc.secure_channel(
        f"127.0.0.1:{t.port}",
        grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem),
        options=channel_options(),
    )
    session = [(SESSION_HEADER, conn.session_id)]
    try:
        upload = channel.stream_unary(path("Upload"))
        reply = upload(iter([b"\xff\xfe garbage \x00\x01"]), timeout=10, metadata=session)
        assert b"cannot decode UploadMessage" in reply
        get_instruction = channel.unary_unary(path("GetInstruction"))
        with pytest.raises(grpc.RpcError) as err:
            get_instruction(b"\x0f not a InstructionRequest", timeout=10, metadata=session)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
    start_honest(fed, shift_runner)
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 2


def test_a_site_not_selected_for_the_round_cannot_answer_it(
    make_grpc_federation: Any, tiny_weights: Weights, shift_runner: Any
) -> None:
    fed = make_grpc_federation(sites_per_round=2, rounds=1, final_evaluation=False)
    fed.start()
    opened = fed.log.wait_opened(1)
    (left_out,) = set(SITES) - set(opened.selected)
    delta = shift_runner.delta_like(tiny_weights, 0, 1)
    header = UpdateHeader(1, 10, specs_of(delta), {}, attempt_id(1))
    receipt = fed.transport.connect(left_out).upload(header, iter_chunks(delta))
    assert not receipt.accepted
    assert f"site {left_out!r} was not selected for round 1" in receipt.reason
    start_honest(fed, shift_runner, tuple(sorted(opened.selected)))
    (record,) = fed.finish()
    assert [r.site for r in record.results] == sorted(opened.selected)
    assert record.failures == ()


def test_a_claimed_sample_count_is_capped_by_the_plan_and_recorded(
    make_grpc_federation: Any, tiny_weights: Weights, shift_runner: Any
) -> None:
    fed = make_grpc_federation(rounds=1, final_evaluation=False, max_samples=40)
    fed.start()
    fed.log.wait_opened(1)
    start_honest(fed, shift_runner, ("site-a", "site-b"))
    delta = shift_runner.delta_like(tiny_weights, 2, 1)
    header = UpdateHeader(
        1, 10**9, specs_of(delta), {}, attempt_id(1)
    )  # "I have a billion patients"
    assert fed.transport.connect("site-c").upload(header, iter_chunks(delta)).accepted
    (record,) = fed.finish()
    liar = next(r for r in record.results if r.site == "site-c")
    assert (liar.num_samples, liar.claimed_samples) == (40, 10**9)
    assert [r.num_samples for r in record.results] == [10, 30, 40]


def test_a_site_gives_up_once_the_aggregator_is_silent_for_its_limit(
    grpc_federation: Any,
) -> None:
    from fedloom.core.errors import AggregatorLost

    fed = grpc_federation
    fed.start()
    fed.log.wait_opened(1)
    conn = fed.transport.connect("site-a", connect_seconds=1.0)
    assert conn.get_instruction(timeout=0) is not None  # in touch: round 1 is open for it
    fed.transport.server.stop(grace=0)  # the aggregator's machine is gone
    with pytest.raises(AggregatorLost, match="cannot reach the aggregator"):
        conn.get_instruction(timeout=0)


def in_flight(t: GrpcTestTransport, site: str) -> int:
    return t.server.gate.in_flight(site)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_one_site_cannot_take_every_server_thread(
    grpc_federation: Any, shift_runner: Any, aggregator_log: Callable[[], str]
) -> None:
    from fedloom.core.errors import TransportError

    fed = grpc_federation
    t = fed.transport
    limit = t.server.settings.calls_per_site
    greedy = t.connect("site-c")
    greedy.open()
    # no round is open yet: each ask for work waits at the aggregator, holding a call
    for i in range(limit):
        fed.spawn(f"long poll {i}", greedy.get_instruction)
    wait_until(lambda: in_flight(t, "site-c") == limit, "the long polls never all arrived")
    with pytest.raises(TransportError, match=f"already has {limit} calls under way"):
        greedy.get_instruction(timeout=0)
    assert f"site 'site-c' already has {limit} calls under way" in aggregator_log()

    fed.start()  # round 1 opens: the long polls get their answer and end
    start_honest(fed, shift_runner, ("site-a", "site-b"))
    finish_without_site_c(fed)
    for worker in fed.extra:
        worker.join()
    wait_until(lambda: not t.server.gate.in_flight(), "a call is still counted")


def test_asks_for_work_the_caller_cancels_free_their_server_thread(
    grpc_federation: Any, shift_runner: Any
) -> None:
    """The attack of issue 14: ask for work with an hour's wait, hang up at once, again
    and again. Each wait must end with its call, or the server's threads are soon all
    waiting for nobody and honest sites cannot even say Hello."""
    fed = grpc_federation
    t = fed.transport
    hostile = t.connect("site-c")
    hostile.open()
    creds = site_credentials(t.states["site-c"])
    channel = grpc.secure_channel(
        f"127.0.0.1:{t.port}",
        grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem),
        options=channel_options(),
    )
    threads = t.server.threads
    try:
        get_instruction = channel.unary_unary(path("GetInstruction"))
        an_hour = serde.encode_task_request(3600.0)
        for i in range(3 * threads):  # far more calls than the server has threads
            call = get_instruction.future(
                an_hour, timeout=4000, metadata=[(SESSION_HEADER, hostile.session_id)]
            )
            wait_until(lambda: in_flight(t, "site-c") == 1, f"call {i} never got a thread")
            call.cancel()
            wait_until(lambda: in_flight(t, "site-c") == 0, f"call {i} still holds its thread")
    finally:
        channel.close()
    fed.start()
    start_honest(fed, shift_runner, ("site-a", "site-b"))
    finish_without_site_c(fed)


def finish_without_site_c(fed: Any) -> Any:
    """Both rounds close at their deadline with site-a's and site-b's updates."""
    for rnd in (1, 2):
        fed.log.wait_opened(rnd)
        fed.log.wait_answered(rnd, 2)
        fed.pass_deadline()  # site-c does not answer
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.DEADLINE_QUORUM] * 2
    assert [[a.site for a in r.results] for r in history] == [["site-a", "site-b"]] * 2
    return history


@pytest.mark.parametrize(
    ("details", "refused"),
    [
        (  # the site does not trust the aggregator's certificate
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:40079: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
            "certificate: OK",
            True,
        ),
        (  # the aggregator was killed while a handshake was under way
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:41053: "
            "Handshake read failed (recvmsg:Connection reset by peer (104))",
            False,
        ),
        (  # the aggregator is not listening (restarting)
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:41053: "
            "Connection refused",
            False,
        ),
    ],
)
def test_a_certificate_refusal_is_told_from_a_connection_that_broke(
    details: str, refused: bool
) -> None:
    """Messages seen from grpcio on this machine: only a refused certificate ends a
    collaborator (exit 11); a broken handshake is retried like any outage."""
    assert certificate_refused(details) is refused


def test_a_second_process_on_one_identity_replaces_the_first_whose_calls_are_refused(
    grpc_federation: Any, shift_runner: Any, aggregator_log: Callable[[], str]
) -> None:
    fed = grpc_federation
    t = fed.transport
    first = t.connect("site-c")
    first.open()
    waiting = fed.spawn("first's ask for work", first.get_instruction)  # no round open: it waits
    wait_until(lambda: in_flight(t, "site-c") == 1, "the first process never asked for work")
    t.connect("site-c").open()  # a second process, with the same certificate
    # the first one's wait ends at once, refused, and so is every later call of it
    with pytest.raises(AccessDenied, match="replaced this one's session"):
        waiting.join()
    with pytest.raises(AccessDenied, match="another collaborator process said Hello as 'site-c'"):
        first.heartbeat(Heartbeat(0))
    assert "site site-c: a second collaborator process said Hello" in aggregator_log()
    assert "replaces the session of the one at" in aggregator_log()
    fed.extra.remove(waiting)
    fed.start()
    start_honest(fed, shift_runner)  # site-c's collaborator: a third process, replacing both
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 2


def _under_an_intermediate(workspace: Path, site: str, folder: Path) -> Path:
    """A state folder for ``site`` whose certificate an intermediate CA (CA:TRUE, made
    with the federation's CA key, as a careless or compromised CA holder might) signed:
    the chain the root's pathlen:0 forbids. site.crt holds the leaf and the intermediate."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from fedloom.pki.authority import load_ca, sign_leaf
    from fedloom.pki.common import new_key, private_key_pem

    root_key, root = load_ca(workspace / "pki")
    middle_key = new_key()
    stamp = dt.datetime.now(dt.UTC)
    middle = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.subject)
        .public_key(middle_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(stamp - dt.timedelta(minutes=5))
        .not_valid_after(stamp + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(root_key, hashes.SHA256())
    )
    site_key = new_key()
    leaf = sign_leaf(
        middle_key,
        middle,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]),
        public_key=site_key.public_key(),
        days=30,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    folder.mkdir(parents=True)
    pem = serialization.Encoding.PEM
    (folder / "site.key").write_bytes(private_key_pem(site_key))
    (folder / "site.key").chmod(0o600)
    (folder / "site.crt").write_bytes(leaf.public_bytes(pem) + middle.public_bytes(pem))
    (folder / "ca.crt").write_bytes(root.public_bytes(pem))
    return folder


def test_a_certificate_under_an_intermediate_ca_is_refused_the_root_allows_none(
    grpc_federation: Any, shift_runner: Any, aggregator_log: Callable[[], str]
) -> None:
    """The federation's CA has pathlen:0: a leaf signed by an intermediate it signed is
    refused by the aggregator's own check of the peer certificate, whatever the TLS
    library accepted, and the federation carries on."""
    fed = grpc_federation
    t = fed.transport
    state = _under_an_intermediate(t.workspace, "site-a", t.workspace / "chained" / "site-a")
    fed.start()
    with pytest.raises(AccessDenied, match="not issued directly by the federation's CA"):
        t.connect("site-a", state=state, connect_seconds=60.0).open()
    assert "path length" in aggregator_log()
    start_honest(fed, shift_runner)
    history = fed.finish()
    assert [r.close_reason for r in history] == [CloseReason.ALL_ANSWERED] * 2


def test_a_site_certificate_of_another_ca_is_named_as_the_likely_cause(
    grpc_federation: Any, tmp_path: Path
) -> None:
    """The site trusts the federation's CA (its ca.crt is right) but holds a certificate
    another CA signed: the aggregator closes the connection in the handshake, which the
    site sees as "Socket closed"; the error names the certificate, not a dead aggregator."""
    fed = grpc_federation
    fed.start()
    foreign = provision(tmp_path / "other-federation", ["site-a"])["site-a"]
    (foreign / "ca.crt").write_bytes((fed.transport.workspace / "pki" / "ca.crt").read_bytes())
    # the closed socket looks passing: the site tries again until it gives up (1 s here)
    conn = fed.transport.connect("site-a", state=foreign, connect_seconds=1.0)
    with pytest.raises(TransportError) as err:
        conn.open()
    said = str(err.value)
    assert "is it running" not in said
    assert "this site's certificate" in said and "another CA" in said, said


def test_a_call_without_a_session_is_refused_with_a_typed_code_and_the_client_says_hello_again(
    grpc_federation: Any,
) -> None:
    fed = grpc_federation
    t = fed.transport
    creds = site_credentials(t.states["site-a"])
    channel = grpc.secure_channel(
        f"127.0.0.1:{t.port}",
        grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem),
        options=channel_options(),
    )
    try:  # a process that never said Hello: the refusal's code is data, not prose
        heartbeat = channel.unary_unary(path("Heartbeat"))
        beat = serde.encode(Heartbeat(0))
        with pytest.raises(grpc.RpcError) as err:
            heartbeat(beat, timeout=10, metadata=[(SESSION_HEADER, "never-said-hello")])
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert (REFUSAL_HEADER, NO_SESSION) in tuple(err.value.trailing_metadata())
    finally:
        channel.close()
    # the client reads that code: a connection whose session the aggregator lost (as when
    # it restarts) says Hello again and its call goes through
    conn = t.connect("site-a")
    first = conn.open()
    t.server.gate.sessions.clear()  # what the aggregator's restart does to its sessions
    assert conn.heartbeat(Heartbeat(0)).open_round == 0
    assert "site-a" in t.server.gate.sessions and conn.welcome is not first  # a new Hello
