"""The aggregator's gRPC server: mutual TLS, identity from the certificate, thin handlers.

Every call passes :class:`~fedloom.transport.grpc.gatekeeper.Gatekeeper` first (a server
interceptor): the peer's certificate must be signed by the federation's CA (TLS checked
that), not revoked, name a site of the plan, and have said :class:`~fedloom.transport.Hello`
with the same plan hash and protocol version. The handlers then only translate bytes to
domain messages and call the :class:`~fedloom.transport.AggregatorService`. What a
collaborator sends can fail its own upload, never the server."""

from __future__ import annotations

import errno
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from fedloom.core.errors import FedloomError, TransportError, UpdateRejected
from fedloom.core.records import InstructionKind
from fedloom.core.sanitize import MAX_TEXT_CHARS, printable
from fedloom.pki import Credentials, RevocationList
from fedloom.transport import integrity, serde
from fedloom.transport.base import AggregatorService, Cancellation
from fedloom.transport.grpc.gatekeeper import (
    Gatekeeper,
    ServerSettings,
    SiteSession,
    refuse,
)
from fedloom.transport.grpc.wire import (
    MAX_CONTROL_BYTES,
    MAX_EXCHANGE_BYTES,
    MAX_HEADER_BYTES,
    METHODS,
    PROTOCOL_VERSION,
    SERVICE,
    server_options,
)
from fedloom.transport.messages import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    Heartbeat,
    Hello,
    StreamEnd,
    UpdateHeader,
    UploadReceipt,
    Welcome,
)
from fedloom.transport.traffic import TrafficCounter

log = logging.getLogger("fedloom.aggregator")


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
            refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.protocol_version} from {site!r}; the aggregator "
                f"speaks {PROTOCOL_VERSION}",
                hint="run the same fedloom version on both sides",
            )
        if hello.site != site:
            refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the collaborator calls itself '{printable(hello.site, MAX_TEXT_CHARS)}' but "
                f"its certificate belongs to {site!r}",
                hint="start it with --name matching its certificate",
            )
        if hello.plan_hash != s.plan_hash:
            refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan hash of {site!r} is {printable(hello.plan_hash[:16])}…, the aggregator's is "
                f"{s.plan_hash[:16]}…",
                hint=f"the hash covers {s.plan_covers}: one of them differs between the "
                "two sides; compare `fedloom plan show` on both",
            )
        self.gate.welcome(context, site, serial)
        log.info("site %s joined (certificate serial %x) from %s", site, serial, context.peer())
        self.service.join(site)  # a withdrawal it made before no longer holds
        welcome = Welcome(
            PROTOCOL_VERSION, s.federation, s.rounds, s.heartbeat_seconds, s.certificate
        )
        return serde.encode(welcome)

    def get_instruction(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        site, _ = self.gate.identify(context)
        _check_size(context, "GetInstruction", request, MAX_CONTROL_BYTES)
        try:
            wait = serde.decode_task_request(request)
        except TransportError as err:
            refuse(context, grpc.StatusCode.INVALID_ARGUMENT, err.message)
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
            instruction = self.service.get_instruction(site, wait, cancel)
        finally:
            answered.set()
            self.gate.done_waiting(site, cancel)
        replaced = self.gate.replaced(context, site)
        if replaced is not None:  # the work is for the process that replaced this one
            refuse(context, grpc.StatusCode.PERMISSION_DENIED, replaced.message(site), quiet=True)
        if instruction is not None and instruction.kind is InstructionKind.FINISHED:
            with self._told:
                self.told_finished.add(site)
                self._told.notify_all()
        return serde.encode_instruction_reply(instruction)

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        site, _ = self.gate.identify(context)
        round = _decode_with(context, serde.decode_download_request, request, what="Download")
        try:
            stream = self.service.download(site, round)
        except UpdateRejected as err:
            refuse(context, grpc.StatusCode.FAILED_PRECONDITION, err.message, quiet=True)
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
            return serde.encode(UploadReceipt(0, False, reason))
        if not isinstance(first, UpdateHeader):
            reason = "upload must start with its header, got a chunk"
            log.warning("rejected an upload from %s: %s", site, reason)
            return serde.encode(UploadReceipt(0, False, reason))
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
        message = _decode(context, ExchangeMessage, request, MAX_EXCHANGE_BYTES)
        try:
            return serde.encode(self.service.exchange(site, message))
        except UpdateRejected as err:
            refuse(context, grpc.StatusCode.FAILED_PRECONDITION, err.message)

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
        refuse(context, grpc.StatusCode.INVALID_ARGUMENT, err.message)


def _check_size(context: grpc.ServicerContext, what: str, data: bytes, limit: int) -> None:
    """Refuse a message that carries no tensors yet is larger than ``limit`` bytes, before
    it is decoded."""
    if len(data) > limit:
        refuse(context, grpc.StatusCode.INVALID_ARGUMENT, _too_large(what, len(data), limit))


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
        self.threads = threads  # the server's threads, every call of every site together
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
        "GetInstruction": (grpc.unary_unary_rpc_method_handler, h.get_instruction),
        "Download": (grpc.unary_stream_rpc_method_handler, h.download),
        "Upload": (grpc.stream_unary_rpc_method_handler, h.upload),
        "ReportFailure": (grpc.unary_unary_rpc_method_handler, h.report_failure),
        "Exchange": (grpc.unary_unary_rpc_method_handler, h.exchange),
        "Heartbeat": (grpc.unary_unary_rpc_method_handler, h.heartbeat),
    }
    return {name: kinds[name][0](kinds[name][1]) for name in METHODS}
