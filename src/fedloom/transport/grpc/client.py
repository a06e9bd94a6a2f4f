"""A collaborator's gRPC connection: one long-lived mutual-TLS channel, outbound only.

Every call has a deadline. A lost aggregator is retried with exponential backoff and
full jitter for the calls that are safe to repeat (asking for work, downloading,
heartbeats, failure reports); an upload that breaks off is not repeated, since the
aggregator has already recorded it as failed. ``grpc.RpcError`` becomes fedloom's
own errors here and nowhere else: :class:`~fedloom.core.errors.AccessDenied` when the
aggregator refused this site (the collaborator should stop), :class:`~fedloom.core.errors.
UpdateRejected` for a round that is no longer open, :class:`~fedloom.core.errors.
TransportError` for the rest.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from fedloom.core.errors import (
    AccessDenied,
    AggregatorLost,
    FedloomError,
    TransportError,
    UpdateRejected,
)
from fedloom.core.records import Instruction
from fedloom.pki import Credentials
from fedloom.transport import integrity, serde
from fedloom.transport.grpc.wire import (
    NO_SESSION,
    PROTOCOL_VERSION,
    REFUSAL_HEADER,
    SESSION_HEADER,
    channel_options,
    path,
)
from fedloom.transport.messages import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    Heartbeat,
    HeartbeatReply,
    Hello,
    ModelHeader,
    ModelStream,
    StreamEnd,
    UpdateHeader,
    UploadReceipt,
    Welcome,
)

log = logging.getLogger("fedloom.collaborator")

T = TypeVar("T")

_TLS_HINT = (
    "the TLS handshake failed. Likely causes: this site's certificate was signed by "
    "another CA than the aggregator's (were the certificates made for this federation? "
    "`fedloom pki accept` installs them), the aggregator's certificate is not signed by "
    "the ca.crt in this site's state folder, or the address does not match a name in "
    "the aggregator's certificate (`fedloom pki server --host`)"
)

# A server that refuses the client's certificate closes the socket in the handshake:
# the client sees only "Socket closed", which is also what a restarting server may give.
_CLOSED_CAUSE = (
    "most likely it does not accept this site's certificate (site.crt signed by another "
    "CA than the federation's, a certificate under an intermediate CA, or a revoked one)"
)
_CLOSED_HINT = (
    "compare the issuer of this site's site.crt with the federation's CA (`openssl x509 "
    "-in site.crt -noout -issuer -fingerprint -sha256`, and `fedloom pki list` at the CA); "
    "install the certificate the federation's CA signed with `fedloom pki accept`. If the "
    "aggregator was restarting, start the collaborator again"
)


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    address: str  # host:port of the aggregator
    site: str
    plan_hash: str
    server_name: str | None = None  # the aggregator certificate's name, if not the host
    call_seconds: float = 30.0  # deadline of every unary call
    stream_seconds: float = 3600.0  # deadline of one download or upload
    wait_seconds: float = 30.0  # how long one ask for work may wait at the aggregator
    connect_seconds: float | None = None  # give up reaching the aggregator after this
    backoff_base: float = 0.5
    backoff_max: float = 30.0


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 30)))


class GrpcConnection:
    """:class:`~fedloom.transport.Connection` over gRPC. :meth:`open` says Hello; the
    first call does it if :meth:`open` was not called."""

    def __init__(
        self,
        credentials: Credentials,
        settings: ClientSettings,
        *,
        stop: threading.Event | None = None,
        session_id: str | None = None,
        on_wait: Callable[[str | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        # told why each retry waits (a short reason: wait_reason), and None once a call
        # gets through after waiting: the collaborator shows it on the screen
        self._on_wait = on_wait or (lambda reason: None)
        self._waited = False
        self.welcome: Welcome | None = None
        self._last_contact = time.monotonic()
        self.protocol_version = PROTOCOL_VERSION
        self._rng = random.Random()  # jitter only; never the plan's seed  # noqa: S311
        creds = grpc.ssl_channel_credentials(
            root_certificates=credentials.ca_pem,
            private_key=credentials.key_pem,
            certificate_chain=credentials.cert_pem,
        )
        self._channel = grpc.secure_channel(
            settings.address, creds, options=channel_options(settings.server_name)
        )
        # this process's session id, sent with every call: the aggregator keeps one live
        # session per site and refuses the calls of one another process replaced
        self.session_id = session_id or secrets.token_hex(16)
        c = grpc.intercept_channel(self._channel, _SessionHeader(self.session_id))
        self._hello = c.unary_unary(path("Hello"))
        self._get_task = c.unary_unary(path("GetInstruction"))
        self._download = c.unary_stream(path("Download"))
        self._upload = c.stream_unary(path("Upload"))
        self._report = c.unary_unary(path("ReportFailure"))
        self._exchange = c.unary_unary(path("Exchange"))
        self._heartbeat = c.unary_unary(path("Heartbeat"))

    @property
    def site(self) -> str:
        return self.settings.site

    # ------------------------------------------------------------ the session

    def open(self) -> Welcome:
        """Reach the aggregator (retrying with backoff) and say Hello."""
        s = self.settings
        hello = serde.encode(Hello(self.protocol_version, s.plan_hash, s.site))
        reply = self._retrying("Hello", lambda: self._hello(hello, timeout=s.call_seconds))
        self.welcome = serde.decode(Welcome, reply)
        return self.welcome

    def close(self) -> None:
        self._channel.close()

    # ------------------------------------------------------- the Connection

    def get_instruction(self, timeout: float | None = None) -> Instruction | None:
        s = self.settings
        wait = s.wait_seconds if timeout is None else min(timeout, s.wait_seconds)
        request = serde.encode_task_request(wait)
        reply = self._session(
            "GetInstruction", lambda: self._get_task(request, timeout=wait + s.call_seconds)
        )
        return serde.decode_instruction_reply(reply)

    def download(self, round: int) -> ModelStream:
        request = serde.encode_download_request(round)

        def start() -> tuple[ModelHeader, Any]:
            responses = self._download(request, timeout=self.settings.stream_seconds)
            first = serde.decode_download_item(next(responses, b""))
            if not isinstance(first, ModelHeader):
                responses.cancel()
                raise TransportError("the download did not start with the model's header")
            return first, responses

        header, responses = self._session("Download", start)
        return ModelStream(header, integrity.verified(header.tensors, _chunks(responses)))

    def upload(self, header: UpdateHeader, chunks: Iterable[Chunk]) -> UploadReceipt:
        def messages() -> Iterator[bytes]:
            yield serde.encode_stream_item(header)
            count = 0
            for chunk in integrity.stamp(header.tensors, chunks):
                yield serde.encode_stream_item(chunk)
                count += 1
            yield serde.encode_stream_item(StreamEnd(count))

        if self.welcome is None:
            self.open()
        try:
            reply = self._upload(messages(), timeout=self.settings.stream_seconds)
        except grpc.RpcError as err:
            raise self._lost_session(_translate(err, "Upload")) from None
        return serde.decode(UploadReceipt, reply)

    def report_failure(self, report: FailureReport) -> None:
        request = serde.encode(report)
        self._session(
            "ReportFailure", lambda: self._report(request, timeout=self.settings.call_seconds)
        )

    def exchange(self, message: ExchangeMessage) -> ExchangeMessage:
        request = serde.encode(message)
        if self.welcome is None:
            self.open()
        try:
            reply = self._exchange(request, timeout=self.settings.stream_seconds)
        except grpc.RpcError as err:
            raise self._lost_session(_translate(err, "Exchange")) from None
        return serde.decode(ExchangeMessage, reply)

    def heartbeat(self, beat: Heartbeat) -> HeartbeatReply:
        request = serde.encode(beat)
        reply = self._session(
            "Heartbeat", lambda: self._heartbeat(request, timeout=self.settings.call_seconds)
        )
        return serde.decode(HeartbeatReply, reply)

    # ------------------------------------------------------------ retrying

    def _lost_session(self, error: FedloomError) -> FedloomError:
        """A call that cannot be repeated met a restarted aggregator: the next call says
        Hello again; this one fails."""
        if isinstance(error, _NoSession):
            self.welcome = None
            return TransportError(f"{error.message}: the aggregator restarted meanwhile")
        return error

    def _session(self, name: str, call: Callable[[], T]) -> T:
        """``call`` retried through outages; says Hello first, and again when the
        aggregator lost this site's session (it restarted)."""
        if self.welcome is None:
            self.open()
        try:
            return self._retrying(name, call)
        except _NoSession:
            self.open()
            return self._retrying(name, call)

    def _retrying(self, name: str, call: Callable[[], T]) -> T:
        """``call``, retried with backoff while the aggregator is unreachable, for up to
        ``connect_seconds`` since it last answered (forever when that is ``None``)."""
        s = self.settings
        attempt = 0
        refusals = 0  # certificate refusals in a row: three are taken as final
        while True:
            try:
                result = call()
            except grpc.RpcError as err:
                error = _translate(err, name)
            else:
                self._last_contact = time.monotonic()
                if self._waited:
                    self._waited = False
                    self._on_wait(None)
                return result
            if not isinstance(error, _Unreachable):
                raise error
            refusals = refusals + 1 if error.handshake else 0
            if refusals >= 3:
                raise error.final()
            silent = time.monotonic() - self._last_contact
            if s.connect_seconds is not None and silent >= s.connect_seconds:
                raise error.final()
            delay = backoff_delay(attempt, s.backoff_base, s.backoff_max, self._rng)
            if s.connect_seconds is not None:
                delay = min(delay, max(0.0, s.connect_seconds - silent))
            log.warning("%s; retrying in %.1f s", error.message, delay)
            self._waited = True
            self._on_wait(wait_reason(error.message, handshake=error.handshake))
            if self.stop.wait(delay):
                raise TransportError(f"{name}: stopped while waiting for the aggregator")
            attempt += 1


class _SessionHeader(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
):
    """Adds this process's session id to every call's metadata."""

    def __init__(self, session_id: str) -> None:
        self._header = (SESSION_HEADER, session_id)

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Unreachable(TransportError):
    """The aggregator could not be reached (worth retrying)."""

    def __init__(self, message: str, *, handshake: bool) -> None:
        super().__init__(message)
        self.handshake = handshake

    def final(self) -> FedloomError:
        if self.handshake:
            return AccessDenied(f"cannot reach the aggregator: {_TLS_HINT}. ({self.message})")
        if "socket closed" in self.message.lower():  # it listens, and hung up in the handshake
            return AggregatorLost(
                "the aggregator accepted the connection and closed it during the TLS "
                f"handshake, each time: {_CLOSED_CAUSE} ({self.message})",
                hint=_CLOSED_HINT,
            )
        return AggregatorLost(
            f"cannot reach the aggregator: {self.message}",
            hint="is it running, and is the address right? it may be behind a firewall",
        )


class _NoSession(TransportError):
    """The aggregator does not know this site's session (it restarted): say Hello."""


_REASONS = (  # what gRPC's details say, and the reason a person is shown
    (("connection refused",), "connection refused: nothing listens at that address"),
    (("lookup", "resolv", "domain name not found"), "the host name does not resolve"),
    (("socket closed",), "the connection was closed during the TLS handshake"),
    (("connection reset", "broken pipe"), "the connection was reset"),
    (("no route to host", "network is unreachable"), "no route to the host"),
    (("timeout", "timed out", "deadline"), "no answer in time"),
)


def wait_reason(message: str, *, handshake: bool = False) -> str:
    """A short reason for a failed try to reach the aggregator, from gRPC's words in
    ``message`` (``connection refused: nothing listens at that address`` …): what a
    waiting collaborator shows on its screen; the log keeps the whole message."""
    if handshake:
        return "the TLS handshake failed"
    lowered = message.lower()
    for words, reason in _REASONS:
        if any(w in lowered for w in words):
            return reason
    last = message.rsplit("last error:", 1)[-1].strip()
    return last if len(last) <= 120 else last[:119] + "…"


def certificate_refused(details: str) -> bool:
    """Whether gRPC's UNAVAILABLE ``details`` say a certificate was refused in the TLS
    handshake (for good), rather than that the connection broke during it (the
    aggregator restarting, the network: worth retrying), however that is worded."""
    lowered = details.lower()
    refused = ("certificate", "verify", "ssl_error_ssl", "alert", "hostname", "peer name")
    broken = ("connection reset", "socket closed", "broken pipe", "connection refused")
    return any(w in lowered for w in refused) and not any(w in lowered for w in broken)


def _refusal(err: grpc.RpcError) -> str | None:
    """The aggregator's refusal code in the call's trailing metadata, if it sent one."""
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return next((str(v) for k, v in trailing or () if k == REFUSAL_HEADER), None)


def _translate(err: grpc.RpcError, name: str) -> FedloomError:
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return _Unreachable(f"{name}: {details}", handshake=certificate_refused(details))
    if _refusal(err) == NO_SESSION:
        return _NoSession(f"{name}: {details}")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return AccessDenied(f"the aggregator refused this site: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if name == "Hello":
            return AccessDenied(f"the aggregator refused this site: {details}")
        return UpdateRejected(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TransportError(f"{name}: no answer before the call's deadline")
    return TransportError(f"{name}: {code.name if code else 'error'}: {details}")


def _chunks(responses: Any) -> Iterator[Chunk]:
    """The download's chunks; the call is cancelled if the reader stops early."""
    try:
        for raw in responses:
            item = serde.decode_download_item(raw)
            if not isinstance(item, Chunk):
                raise TransportError("a second header inside one download")
            yield item
    except grpc.RpcError as err:
        raise _translate(err, "Download") from None
    finally:
        responses.cancel()  # a no-op once the stream has ended
