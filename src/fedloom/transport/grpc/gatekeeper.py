"""Who may call the aggregator's gRPC server: :class:`Gatekeeper`, the server interceptor
every call passes first, and the sites' live sessions.

The peer's certificate must be signed by the federation's CA (TLS checked that), not
revoked, name a site of the plan, and have said :class:`~fedloom.transport.Hello` with
the same plan hash and protocol version; one collaborator process per site (a second
Hello with the site's certificate replaces the first session, whose calls are told why).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from fedloom.core.errors import CertificateError
from fedloom.core.sanitize import printable
from fedloom.pki import RevocationList, peer_identity
from fedloom.pki.common import check_peer_chain, load_cert
from fedloom.transport.base import Cancellation
from fedloom.transport.grpc.wire import NO_SESSION, REFUSAL_HEADER, SESSION_HEADER

log = logging.getLogger("fedloom.aggregator")


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    address: str  # host:port to listen on; port 0 picks a free one
    plan_hash: str
    # what the hash covers, in words (a refused site is told where the sides may differ)
    plan_covers: str = "federation.yaml and the workspace's .py files"
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
            refuse(context, grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        with self._lock:
            known = self._identities.get(pem)
        if known is None:
            try:
                known = peer_identity(pem)
                if self._ca is not None:
                    check_peer_chain(pem, self._ca)
            except CertificateError as err:
                refuse(context, grpc.StatusCode.PERMISSION_DENIED, err.message, hint=err.hint)
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
            refuse(context, grpc.StatusCode.UNAVAILABLE, "the aggregator cannot check revocations")
        if revoked:
            refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate of {site!r} (serial {serial:x}) has been revoked",
                hint="ask the federation's CA for a new certificate",
            )
        if site not in self.settings.roster:
            refuse(
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
            refuse(context, grpc.StatusCode.PERMISSION_DENIED, replaced.message(site), quiet=True)
        refuse(
            context, grpc.StatusCode.UNAUTHENTICATED, "say Hello first", quiet=True, why=NO_SESSION
        )

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
        refuse(
            context,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"site {site!r} already has {limit} calls under way",
            quiet=not loud,
        )

    def in_flight(self, site: str | None = None) -> int:
        """Calls under way (each holding a server thread): ``site``'s, or every site's."""
        with self._lock:
            if site is None:
                return sum(self._in_flight.values())
            return self._in_flight.get(site, 0)

    def _release(self, site: str) -> None:
        with self._lock:
            self._in_flight[site] -= 1

    def welcome(self, context: grpc.ServicerContext, site: str, serial: int) -> None:
        """Open ``site``'s session for the calling process; a session another process
        held for the same site is replaced: its waiting calls end, its later calls are
        refused, saying why."""
        instance = session_id(context)
        if not instance:
            refuse(
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


def refuse(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    *,
    hint: str | None = None,
    quiet: bool = False,
    why: str | None = None,
) -> NoReturn:
    """End the call with ``code`` and ``message`` (logged unless ``quiet``); ``why``, one
    of the wire's refusal codes, travels in the trailing metadata for the client to act on."""
    text = message if hint is None else f"{message} ({hint})"
    if not quiet:
        log.warning("refused %s: %s", context.peer(), printable(text))
    if why is not None:
        context.set_trailing_metadata(((REFUSAL_HEADER, why),))
    context.abort(code, text)
    raise RuntimeError("grpc's abort returned")  # it raises; this keeps the types honest
