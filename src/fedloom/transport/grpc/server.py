"""The aggregator's gRPC server: mutual TLS, identity from the certificate, thin handlers.

Every call passes :class:`Gatekeeper` first (a server interceptor): the peer's
certificate must be signed by the federation's CA (TLS checked that), not revoked,
name a site of the plan, and have said :class:`~fedloom.transport.Hello` with the same
plan hash and protocol version. The handlers then only translate bytes to domain
messages and call the :class:`~fedloom.transport.AggregatorService`. What a collaborator
sends can fail its own upload, never the server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from fedloom.errors import CertificateError, FedloomError, TransportError, UpdateRejected
from fedloom.pki import Credentials, RevocationList, peer_identity
from fedloom.pki.common import check_peer_chain, load_cert
from fedloom.records import InstructionKind
from fedloom.transport import integrity, serde
from fedloom.transport.base import AggregatorService
from fedloom.transport.grpc.wire import (
    METHODS,
    PROTOCOL_VERSION,
    SERVICE,
    server_options,
)
from fedloom.transport.inprocess import TrafficCounter
from fedloom.transport.messages import (
    Chunk,
    FailureReport,
    Heartbeat,
    Hello,
    PhaseMessage,
    Receipt,
    StreamEnd,
    UpdateHeader,
    Welcome,
)

log = logging.getLogger("fedloom.aggregator")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    address: str  # host:port to listen on; port 0 picks a free one
    plan_hash: str
    federation: str
    rounds: int
    roster: frozenset[str]
    heartbeat_seconds: float = 5.0
    calls_per_site: int = 8  # calls one certificate may have in flight at once
    threads: int | None = None  # default: 3 per site + calls_per_site
    certificate: bytes = b""  # the aggregator's certificate (PEM), sent in Welcome


@dataclass
class SiteSession:
    """What the server knows of one site's certificate."""

    site: str
    serial: int
    last_seen: float  # monotonic time of its last call


class Gatekeeper(grpc.ServerInterceptor):  # type: ignore[misc]
    """Checks every call's peer certificate and session before its handler runs."""

    def __init__(
        self,
        settings: ServerSettings,
        revocations: RevocationList | None,
        ca_pem: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.revocations = revocations
        # the federation's CA: a peer's certificate must be directly under it (pathlen:0)
        self._ca = load_cert(ca_pem, "CA certificate") if ca_pem else None
        self._lock = threading.Lock()
        self._identities: dict[bytes, tuple[str, int]] = {}
        self._in_flight: dict[int, int] = {}  # calls under way, by certificate serial
        self.sessions: dict[int, SiteSession] = {}  # by certificate serial

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method).rsplit("/", 1)[-1]
        needs_session = method != "Hello"

        def guard(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                self.admit(context, needs_session=needs_session)
                return behaviour(request, context)

            return guarded

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                guard(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                guard(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            guard(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def identify(self, context: grpc.ServicerContext) -> tuple[str, int]:
        """The peer's (site, serial) from its certificate; aborts without one."""
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        if not pem:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        with self._lock:
            known = self._identities.get(pem)
        if known is None:
            try:
                known = peer_identity(pem)
                if self._ca is not None:
                    check_peer_chain(pem, self._ca)
            except CertificateError as err:
                _refuse(context, grpc.StatusCode.PERMISSION_DENIED, err.message, hint=err.hint)
            with self._lock:
                self._identities[pem] = known
        return known

    def admit(self, context: grpc.ServicerContext, *, needs_session: bool) -> None:
        site, serial = self.identify(context)
        try:
            revoked = self.revocations is not None and self.revocations.is_revoked(serial)
        except CertificateError as err:
            log.error("cannot check revocations: %s", err)
            _refuse(context, grpc.StatusCode.UNAVAILABLE, "the aggregator cannot check revocations")
        if revoked:
            _refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate of {site!r} (serial {serial:x}) has been revoked",
                hint="ask the federation's CA for a new certificate",
            )
        if site not in self.settings.roster:
            _refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"site {site!r} is not in the plan's sites",
                hint="the AI developer adds it to `sites` in federation.yaml",
            )
        if needs_session:
            with self._lock:
                session = self.sessions.get(serial)
                if session is not None:
                    session.last_seen = time.monotonic()
            if session is None:
                _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "say Hello first", quiet=True)
        self._hold(context, site, serial)

    def _hold(self, context: grpc.ServicerContext, site: str, serial: int) -> None:
        """Count the call against its certificate until it ends: one site cannot take
        every server thread, whatever it opens."""
        limit = self.settings.calls_per_site
        with self._lock:
            busy = self._in_flight.get(serial, 0)
            if busy < limit:
                self._in_flight[serial] = busy + 1
        if busy >= limit:
            _refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"site {site!r} already has {limit} calls under way",
            )
        if not context.add_callback(lambda: self._release(serial)):
            self._release(serial)  # the call has already ended

    def _release(self, serial: int) -> None:
        with self._lock:
            self._in_flight[serial] -= 1

    def welcome(self, site: str, serial: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.sessions[serial] = SiteSession(site, serial, now)


def _refuse(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    *,
    hint: str | None = None,
    quiet: bool = False,
) -> NoReturn:
    """End the call with ``code`` and ``message`` (logged unless ``quiet``)."""
    text = message if hint is None else f"{message} ({hint})"
    if not quiet:
        log.warning("refused %s: %s", context.peer(), text)
    context.abort(code, text)
    raise RuntimeError("grpc's abort returned")  # it raises; this keeps the types honest


class Handlers:
    """The service's methods: bytes in, domain messages to the service, bytes out."""

    def __init__(
        self,
        service: AggregatorService,
        settings: ServerSettings,
        gate: Gatekeeper,
        traffic: TrafficCounter,
    ) -> None:
        self.service = service
        self.settings = settings
        self.gate = gate
        self.traffic = traffic
        self.checksums = integrity.ModelChecksums()
        self.told_finished: set[str] = set()
        self._told = threading.Condition()

    def hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, serial = self.gate.identify(context)
        hello = _decode(context, Hello, request)
        s = self.settings
        if hello.protocol_version != PROTOCOL_VERSION:
            _refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.protocol_version} from {site!r}; the aggregator "
                f"speaks {PROTOCOL_VERSION}",
                hint="run the same fedloom version on both sides",
            )
        if hello.site != site:
            _refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the collaborator calls itself {hello.site!r} but its certificate "
                f"belongs to {site!r}",
                hint="start it with --name matching its certificate",
            )
        if hello.plan_hash != s.plan_hash:
            _refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan hash of {site!r} is {hello.plan_hash[:16]}…, the aggregator's is "
                f"{s.plan_hash[:16]}…",
                hint="federation.yaml or a .py file of the workspace differs; compare "
                "`fedloom plan show` on both sides",
            )
        self.gate.welcome(site, serial)
        log.info("site %s joined (certificate serial %x) from %s", site, serial, context.peer())
        welcome = Welcome(
            PROTOCOL_VERSION, s.federation, s.rounds, s.heartbeat_seconds, s.certificate
        )
        return serde.encode(welcome)

    def get_task(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        try:
            wait = serde.decode_task_request(request)
        except TransportError as err:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, err.message)
        task = self.service.get_task(site, wait)
        if task is not None and task.kind is InstructionKind.FINISHED:
            with self._told:
                self.told_finished.add(site)
                self._told.notify_all()
        return serde.encode_task_reply(task)

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        site, _ = self.gate.identify(context)
        round = _decode_with(context, serde.decode_download_request, request)
        try:
            stream = self.service.download(site, round)
        except UpdateRejected as err:
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, err.message, quiet=True)
        yield serde.encode_stream_item(stream.header)
        for chunk in self.checksums.stamp(round, stream.header.tensors, stream.chunks):
            data = serde.encode_stream_item(chunk)
            self.traffic.add(sent=len(data))
            yield data

    def upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        try:
            first = serde.decode_upload_item(next(requests))
        except (StopIteration, FedloomError) as err:
            reason = f"upload must start with its header: {str(err) or 'the stream was empty'}"
            log.warning("rejected an upload from %s: %s", site, reason)
            return serde.encode(Receipt(0, False, reason))
        if not isinstance(first, UpdateHeader):
            reason = "upload must start with its header, got a chunk"
            log.warning("rejected an upload from %s: %s", site, reason)
            return serde.encode(Receipt(0, False, reason))
        chunks = integrity.verified(first.tensors, _chunks(requests, self.traffic))
        receipt = self.service.upload(site, first, chunks)
        what = "update" if first.tensors else "evaluation"
        if receipt.accepted:
            log.info("round %d: %s from %s accepted", receipt.round, what, site)
        else:
            log.warning(
                "round %d: %s from %s rejected: %s", first.round, what, site, receipt.reason
            )
        return serde.encode(receipt)

    def report_failure(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        report = _decode(context, FailureReport, request)
        log.warning("round %d: %s reports a failure: %s", report.round, site, report.reason)
        self.service.report_failure(site, report)
        return b""

    def exchange(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        message = _decode(context, PhaseMessage, request)
        try:
            return serde.encode(self.service.exchange(site, message))
        except UpdateRejected as err:
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, err.message)

    def heartbeat(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        beat = _decode(context, Heartbeat, request)
        return serde.encode(self.service.heartbeat(site, beat))


def _chunks(requests: Iterator[bytes], traffic: TrafficCounter) -> Iterator[Chunk]:
    """The upload's chunks, up to its :class:`StreamEnd`. A stream that stops without
    one was cut off (the site vanished, the network dropped): that raises
    :class:`TransportError`, so it counts as disconnected, not as a site that sent too
    little."""
    count = 0
    received = iter(requests)
    while True:
        try:
            raw = next(received)
        except StopIteration:
            break
        except grpc.RpcError as err:  # the client went away mid-stream
            code = err.code() if hasattr(err, "code") else None
            why = getattr(code, "name", None) or type(err).__name__
            raise TransportError(f"the stream was cut off after {count} chunks ({why})") from err
        traffic.add(received=len(raw))
        try:
            item = serde.decode_upload_item(raw)
        except TransportError as err:
            raise UpdateRejected(err.message) from err
        if isinstance(item, StreamEnd):
            if item.chunks != count:
                raise UpdateRejected(f"the upload says it sent {item.chunks} chunks, {count} came")
            return
        if not isinstance(item, Chunk):
            raise UpdateRejected("a second header inside one upload")
        count += 1
        yield item
    raise TransportError(f"the stream was cut off after {count} chunks, before its end")


def _decode(context: grpc.ServicerContext, kind: type[Any], data: bytes) -> Any:
    return _decode_with(context, lambda d: serde.decode(kind, d), data)


def _decode_with(context: grpc.ServicerContext, decode: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return decode(data)
    except (TransportError, UpdateRejected) as err:
        _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, err.message)


class GrpcServer:
    """Serves an :class:`AggregatorService` over gRPC with mutual TLS."""

    def __init__(
        self,
        service: AggregatorService,
        credentials: Credentials,
        settings: ServerSettings,
        *,
        revocations: RevocationList | None = None,
        traffic: TrafficCounter | None = None,
    ) -> None:
        self.settings = settings
        self.traffic = traffic or TrafficCounter()
        self.gate = Gatekeeper(settings, revocations, credentials.ca_pem)
        self._handlers = handlers = Handlers(service, settings, self.gate, self.traffic)
        threads = settings.threads or 3 * len(settings.roster) + settings.calls_per_site
        self._server = grpc.server(
            futures.ThreadPoolExecutor(threads, thread_name_prefix="fedloom-rpc"),
            interceptors=[self.gate],
            options=server_options(),
        )
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, _method_handlers(handlers))]
        )
        server_creds = grpc.ssl_server_credentials(
            [(credentials.key_pem, credentials.cert_pem)],
            root_certificates=credentials.ca_pem,
            require_client_auth=True,
        )
        try:
            self.port = self._server.add_secure_port(settings.address, server_creds)
        except RuntimeError as err:
            raise TransportError(
                f"cannot listen on {settings.address}: {err}",
                hint="is another aggregator running there? pick another --port",
            ) from err
        if self.port == 0:
            raise TransportError(
                f"cannot listen on {settings.address}",
                hint="is another aggregator running there? pick another --port",
            )

    def start(self) -> int:
        self._server.start()
        return self.port

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()

    def wait_told_finished(self, timeout: float) -> bool:
        """Wait until every site that said Hello has been told the federation finished
        (or ``timeout`` seconds); True if all were told."""
        h = self._handlers
        deadline = time.monotonic() + timeout
        with h._told:
            while True:
                joined = {s.site for s in self.sessions()}
                if joined <= h.told_finished:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                h._told.wait(left)

    def sessions(self) -> list[SiteSession]:
        with self.gate._lock:
            return sorted(self.gate.sessions.values(), key=lambda s: s.site)


def _method_handlers(h: Handlers) -> dict[str, grpc.RpcMethodHandler]:
    kinds: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "Hello": (grpc.unary_unary_rpc_method_handler, h.hello),
        "GetTask": (grpc.unary_unary_rpc_method_handler, h.get_task),
        "Download": (grpc.unary_stream_rpc_method_handler, h.download),
        "Upload": (grpc.stream_unary_rpc_method_handler, h.upload),
        "ReportFailure": (grpc.unary_unary_rpc_method_handler, h.report_failure),
        "Exchange": (grpc.unary_unary_rpc_method_handler, h.exchange),
        "Heartbeat": (grpc.unary_unary_rpc_method_handler, h.heartbeat),
    }
    return {name: kinds[name][0](kinds[name][1]) for name in METHODS}
