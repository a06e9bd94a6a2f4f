"""The aggregator's gRPC server: mutual TLS, identity from the certificate, thin handlers.

Every call passes :class:`Gatekeeper` first (a server interceptor): the peer's
certificate must be signed by the federation's CA (TLS checked that), not revoked,
name a site of the plan, and have said :class:`~fedloom.transport.Hello` with the same
plan hash and protocol version. The handlers then only translate bytes to domain
messages and call the :class:`~fedloom.transport.AggregatorService`. What a collaborator
sends can fail its own upload, never the server.
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from fedloom.core.errors import CertificateError, FedloomError, TransportError, UpdateRejected
from fedloom.core.records import InstructionKind
from fedloom.core.sanitize import MAX_TEXT_CHARS, printable
from fedloom.pki import Credentials, RevocationList, peer_identity
from fedloom.pki.common import check_peer_chain, load_cert
from fedloom.transport import integrity, serde
from fedloom.transport.base import AggregatorService, Cancellation
from fedloom.transport.grpc.wire import (
    MAX_CONTROL_BYTES,
    MAX_EXCHANGE_BYTES,
    MAX_HEADER_BYTES,
    METHODS,
    PROTOCOL_VERSION,
    SERVICE,
    SESSION_HEADER,
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
    calls_per_site: int = 8  # calls one site may have under way at once
    threads: int | None = None  # default: calls_per_site for every site, and one site more
    certificate: bytes = b""  # the aggregator's certificate (PEM), sent in Welcome


@dataclass
class SiteSession:
    """One site's live session: the collaborator process that said Hello last."""

    site: str
    serial: int
    last_seen: float  # monotonic time of its last call
    instance: str = ""  # the session id its process sends with every call
    peer: str = ""  # where its Hello came from
    joined: float = 0.0  # wall-clock time of its Hello
    waits: set[Cancellation] = field(default_factory=set)  # its asks for work under way


@dataclass(frozen=True)
class Replaced:
    """Why a session no longer counts: another process took the site's identity."""

    peer: str  # where the new session's Hello came from
    when: float  # wall-clock time of that Hello

    def message(self, site: str) -> str:
        at = time.strftime("%H:%M:%S UTC", time.gmtime(self.when))
        return (
            f"another collaborator process said Hello as {site!r} with this site's "
            f"certificate (from {self.peer} at {at}) and replaced this one's session: one "
            "site, one collaborator. Stop one of the two; if the other is not yours, the "
            "site's key has leaked: have its certificate revoked (`fedloom pki revoke`)"
        )


_BUSY_LOG_SECONDS = 10.0  # a site's calls over its share are logged once per this
_KEPT_REPLACED = 64  # replaced session ids remembered per site, to tell their calls why


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
        self._in_flight: dict[str, int] = {}  # calls under way (holding a thread), by site
        self.sessions: dict[str, SiteSession] = {}  # the live session of each site
        self._replaced: dict[str, dict[str, Replaced]] = {}  # site -> session id -> why
        self._logged_busy: dict[str, float] = {}  # site -> when a refusal was last logged

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = str(details.method).rsplit("/", 1)[-1]
        needs_session = method != "Hello"

        # A call counts against its site until its handler has let go of the server
        # thread (for a download, until its stream is done or dropped), not merely
        # until the caller hangs up: a site that cancels its calls must not free its
        # count while the threads they took are still busy.
        def guard(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                site = self.admit(context, needs_session=needs_session)
                try:
                    return behaviour(request, context)
                finally:
                    self._release(site)

            return guarded

        def guard_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                site = self.admit(context, needs_session=needs_session)
                try:
                    yield from behaviour(request, context)
                finally:
                    self._release(site)

            return guarded

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                guard(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                guard_stream(handler.unary_stream),
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

    def admit(self, context: grpc.ServicerContext, *, needs_session: bool) -> str:
        """Check the call's certificate and session and count it against its site
        (returned); the caller releases it with :meth:`_release` when it ends."""
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
            self._check_session(context, site, serial)
        self._hold(context, site)
        return site

    def _check_session(self, context: grpc.ServicerContext, site: str, serial: int) -> None:
        """The call must come from the process that holds the site's live session."""
        instance = session_id(context)
        with self._lock:
            session = self.sessions.get(site)
            current = session is not None and session.instance == instance
            if current and session is not None:
                current = session.serial == serial
                session.last_seen = time.monotonic()
            replaced = self._replaced.get(site, {}).get(instance) if instance else None
        if current:
            return
        if replaced is not None:  # never "say Hello": it would take the session back
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED, replaced.message(site), quiet=True)
        _refuse(context, grpc.StatusCode.UNAUTHENTICATED, "say Hello first", quiet=True)

    def _hold(self, context: grpc.ServicerContext, site: str) -> None:
        """Count the call against its site: one site cannot take more than its share of
        the server's threads, whatever it opens and however it hangs up."""
        limit = self.settings.calls_per_site
        now = time.monotonic()
        with self._lock:
            busy = self._in_flight.get(site, 0)
            if busy < limit:
                self._in_flight[site] = busy + 1
                return
            # logged once in a while: a site flooding the server must not flood its log
            loud = now - self._logged_busy.get(site, -_BUSY_LOG_SECONDS) >= _BUSY_LOG_SECONDS
            if loud:
                self._logged_busy[site] = now
        _refuse(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"site {site!r} already has {limit} calls under way",
            quiet=not loud,
        )

    def _release(self, site: str) -> None:
        with self._lock:
            self._in_flight[site] -= 1

    def welcome(self, context: grpc.ServicerContext, site: str, serial: int) -> None:
        """Open ``site``'s session for the calling process; a session another process
        held for the same site is replaced: its waiting calls end, its later calls are
        refused, saying why."""
        instance = session_id(context)
        if not instance:
            _refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the collaborator of {site!r} sent no session id",
                hint="run the same fedloom version on both sides",
            )
        now = time.monotonic()
        peer = context.peer()
        with self._lock:
            old = self.sessions.get(site)
            if old is not None and old.instance == instance:
                old.serial, old.last_seen, old.peer = serial, now, peer
                return  # the same process again (it lost its session, or retried)
            self.sessions[site] = SiteSession(site, serial, now, instance, peer, time.time())
            replaced = self._replaced.setdefault(site, {})
            replaced.pop(instance, None)  # a replaced process that said Hello again
            waits: set[Cancellation] = set()
            if old is not None:
                replaced[old.instance] = Replaced(peer, time.time())
                while len(replaced) > _KEPT_REPLACED:
                    del replaced[next(iter(replaced))]
                waits, old.waits = old.waits, set()
        if old is not None:
            log.warning(
                "site %s: a second collaborator process said Hello with its certificate "
                "(serial %x) from %s; it replaces the session of the one at %s (last heard "
                "%.1f s ago), whose calls are refused from now on. Two processes on one "
                "site's identity: if only one is the data owner's, the site's key has leaked",
                site,
                serial,
                peer,
                old.peer,
                now - old.last_seen,
            )
            for wait in waits:
                wait.cancel()

    def leave(self, context: grpc.ServicerContext, site: str) -> None:
        """End the calling process's session of ``site`` (it withdrew and exits); its
        asks for work under way end."""
        instance = session_id(context)
        with self._lock:
            session = self.sessions.get(site)
            if session is None or session.instance != instance:
                return
            del self.sessions[site]
            waits, session.waits = session.waits, set()
        for wait in waits:
            wait.cancel()

    def waiting(self, context: grpc.ServicerContext, site: str, cancel: Cancellation) -> bool:
        """Note an ask for work of the calling session, to be cancelled if the session is
        replaced; False if it no longer holds the site's session."""
        instance = session_id(context)
        with self._lock:
            session = self.sessions.get(site)
            if session is None or session.instance != instance:
                return False
            session.waits.add(cancel)
            return True

    def done_waiting(self, site: str, cancel: Cancellation) -> None:
        with self._lock:
            session = self.sessions.get(site)
            if session is not None:
                session.waits.discard(cancel)

    def replaced(self, context: grpc.ServicerContext, site: str) -> Replaced | None:
        """Why the calling process's session of ``site`` was replaced, if it was."""
        instance = session_id(context)
        with self._lock:
            return self._replaced.get(site, {}).get(instance) if instance else None


def session_id(context: grpc.ServicerContext) -> str:
    """The session id the calling collaborator process sends with its calls."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_HEADER:
            return str(value)
    return ""


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
        log.warning("refused %s: %s", context.peer(), printable(text))
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
        # Cancellations of calls whose caller hung up: grpc runs its callbacks on its one
        # polling thread, which must never wait for the aggregator's lock, so a thread of
        # ours wakes the waiting calls.
        self.wakeups: queue.SimpleQueue[Cancellation | None] = queue.SimpleQueue()
        self._waker = threading.Thread(target=self._wake, name="fedloom-wakeups", daemon=True)
        self._waker.start()

    def _wake(self) -> None:
        while (cancel := self.wakeups.get()) is not None:
            cancel.cancel()

    def close(self) -> None:
        self.wakeups.put(None)

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
                f"the collaborator calls itself '{printable(hello.site, MAX_TEXT_CHARS)}' but "
                f"its certificate belongs to {site!r}",
                hint="start it with --name matching its certificate",
            )
        if hello.plan_hash != s.plan_hash:
            _refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan hash of {site!r} is {printable(hello.plan_hash[:16])}…, the aggregator's is "
                f"{s.plan_hash[:16]}…",
                hint="federation.yaml or a .py file of the workspace differs; compare "
                "`fedloom plan show` on both sides",
            )
        self.gate.welcome(context, site, serial)
        log.info("site %s joined (certificate serial %x) from %s", site, serial, context.peer())
        self.service.join(site)  # a withdrawal it made before no longer holds
        welcome = Welcome(
            PROTOCOL_VERSION, s.federation, s.rounds, s.heartbeat_seconds, s.certificate
        )
        return serde.encode(welcome)

    def get_task(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        _check_size(context, "GetTask", request, MAX_CONTROL_BYTES)
        try:
            wait = serde.decode_task_request(request)
        except TransportError as err:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, err.message)
        # The wait ends when its caller hangs up or its session is replaced: a site that
        # cancels its asks for work must not leave server threads waiting for nobody.
        cancel = Cancellation()
        answered = threading.Event()

        def hung_up() -> None:  # on grpc's polling thread: hand it to ours, never block
            if not answered.is_set():
                self.wakeups.put(cancel)

        if not context.add_callback(hung_up):
            cancel.cancel()  # the call has already ended
        if not self.gate.waiting(context, site, cancel):
            cancel.cancel()
        try:
            task = self.service.get_task(site, wait, cancel)
        finally:
            answered.set()
            self.gate.done_waiting(site, cancel)
        replaced = self.gate.replaced(context, site)
        if replaced is not None:  # the work is for the process that replaced this one
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED, replaced.message(site), quiet=True)
        if task is not None and task.kind is InstructionKind.FINISHED:
            with self._told:
                self.told_finished.add(site)
                self._told.notify_all()
        return serde.encode_task_reply(task)

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        site, _ = self.gate.identify(context)
        round = _decode_with(context, serde.decode_download_request, request, what="Download")
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
            raw = next(requests)
            if len(raw) > MAX_HEADER_BYTES:
                raise TransportError(_too_large("the upload's header", len(raw), MAX_HEADER_BYTES))
            first = serde.decode_upload_item(raw)
        except (StopIteration, FedloomError) as err:
            reason = f"upload must start with its header: {str(err) or 'the stream was empty'}"
            log.warning("rejected an upload from %s: %s", site, printable(reason))
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
                "round %d: %s from %s rejected: %s",
                first.round,
                what,
                site,
                printable(receipt.reason),
            )
        return serde.encode(receipt)

    def report_failure(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        report = _decode(context, FailureReport, request)
        if report.withdrawn:
            self.service.report_failure(site, report)
            log.warning(
                "site %s withdrew from the federation: %s. Rounds that select it count it "
                "as failed at once, without waiting; it takes part again once it is started "
                "again and says Hello",
                site,
                printable(report.reason),
            )
            self.gate.leave(context, site)  # its process exits: nobody to tell "finished"
            return b""
        # staleness first: a report that settles nothing is not logged (whatever its size)
        if self.service.report_failure(site, report):
            reason = printable(report.reason)
            log.warning("round %d: %s reports a failure: %s", report.round, site, reason)
        else:
            log.debug("round %d: a stale failure report from %s, ignored", report.round, site)
        return b""

    def exchange(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        message = _decode(context, PhaseMessage, request, MAX_EXCHANGE_BYTES)
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


def _decode(
    context: grpc.ServicerContext, kind: type[Any], data: bytes, limit: int = MAX_CONTROL_BYTES
) -> Any:
    return _decode_with(context, lambda d: serde.decode(kind, d), data, limit, kind.__name__)


def _decode_with(
    context: grpc.ServicerContext,
    decode: Callable[[bytes], Any],
    data: bytes,
    limit: int = MAX_CONTROL_BYTES,
    what: str = "the request",
) -> Any:
    _check_size(context, what, data, limit)
    try:
        return decode(data)
    except (TransportError, UpdateRejected) as err:
        _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, err.message)


def _check_size(context: grpc.ServicerContext, what: str, data: bytes, limit: int) -> None:
    """Refuse a message that carries no tensors yet is larger than ``limit`` bytes, before
    it is decoded."""
    if len(data) > limit:
        _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, _too_large(what, len(data), limit))


def _too_large(what: str, size: int, limit: int) -> str:
    return f"{what} is {size} bytes; the aggregator takes at most {limit}"


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
        # Every site may fill its share, and honest sites still find a thread free: no
        # site's calls (counted until their thread is free) take more than its share.
        threads = settings.threads or settings.calls_per_site * (len(settings.roster) + 1)
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
            raise _cannot_listen(settings.address, str(err)) from err
        if self.port == 0:
            raise _cannot_listen(settings.address, "")

    def start(self) -> int:
        self._server.start()
        port: int = self.port
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait()
        self._handlers.close()

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


_LISTEN_HINTS = {
    errno.EADDRINUSE: "is another aggregator running there? stop it, or pick another --port",
    errno.EACCES: "ports below 1024 need privileges: pick another --port",
    errno.EADDRNOTAVAIL: "--host is not an address of this machine: give one of its own, "
    "or 0.0.0.0 (every address)",
}


def _cannot_listen(address: str, grpc_says: str) -> TransportError:
    """Why the server cannot listen on ``address``, in the operating system's words
    (gRPC's own only say that binding failed, and to turn its logging up)."""
    why = listen_problem(address)
    if why is None:
        text = grpc_says.split("; set GRPC_VERBOSITY")[0] or "gRPC refused the address"
    elif why.errno == errno.EADDRINUSE:
        text = f"the port is taken ({why.strerror})"
    else:
        text = why.strerror or str(why)
    code = None if why is None else why.errno
    hint = _LISTEN_HINTS.get(code or 0, "is another aggregator running there? pick another --port")
    return TransportError(f"cannot listen on {address}: {text}", hint=hint)


def listen_problem(address: str) -> OSError | None:
    """The error the operating system gives for listening on ``address`` (``host:port``,
    ``[v6]:port``) as gRPC does (``SO_REUSEADDR``, no ``SO_REUSEPORT``), or None where it
    allows it."""
    host, _, port = address.rpartition(":")
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as err:
        return err if isinstance(err, OSError) else OSError(str(err))
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as err:
                return err
    return None


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
