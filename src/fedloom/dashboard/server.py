"""The dashboard's web server: the standard library's threading HTTP server, read-only.

``GET /`` is the page (:mod:`fedloom.dashboard.page`), ``GET /api/state`` its data
(:func:`fedloom.dashboard.view.dashboard_view`); HEAD answers the same without a body,
and every other method is refused with 405. With a token, a request that does not show
it gets a 401 that holds nothing of the run (:mod:`fedloom.dashboard.access`). Nothing
it serves writes anything: the state database is opened read-only for each reading.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedloom.core.errors import TransportError
from fedloom.dashboard.access import (
    addressed_locally,
    allowed,
    exposure_problem,
    presented_token,
)
from fedloom.dashboard.page import PAGE
from fedloom.dashboard.view import dashboard_view

log = logging.getLogger("fedloom.dashboard")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
FRESH_SECONDS = 0.5  # viewers polling at once share one reading of the state this long

_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # inline style and script only; the script talks to this server alone
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}
_UNAUTHORIZED = (
    "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fedloom dashboard"
    "</title></head><body><h1>401: this dashboard needs its token</h1><p>Open the address "
    "with <code>?token=TOKEN</code>, or send <code>Authorization: Bearer TOKEN</code>, with "
    "the token it was started with.</p></body></html>"
)


class Reading:
    """The dashboard's data, read at most once every ``FRESH_SECONDS``."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._at = -1e9
        self._body = b""

    def body(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._at >= FRESH_SECONDS:
                try:
                    data = self._read()
                except Exception as err:  # the server keeps serving, and says what failed
                    log.exception("dashboard: cannot read the state")
                    data = {"ok": False, "error": f"cannot read the state: {err}", "hint": None}
                    data["updated"] = time.time()
                self._body = json.dumps(data, allow_nan=False, default=str).encode()
                self._at = time.monotonic()
            return self._body


class DashboardServer(ThreadingHTTPServer):
    """A threading HTTP server that knows the dashboard's data and its token."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], reading: Reading, token: str | None) -> None:
        self.reading = reading
        self.token = token
        super().__init__(address, DashboardHandler)


class DashboardHandler(BaseHTTPRequestHandler):
    """Answers GET and HEAD of the page and its data; refuses every other method."""

    server: DashboardServer
    server_version = "fedloom-dashboard"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # POST, PUT, DELETE, ...: the dashboard changes nothing
            return self._refuse
        raise AttributeError(name)

    def _refuse(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b"405: the dashboard is read-only (GET and HEAD only)\n",
            "text/plain; charset=utf-8",
            extra={"Allow": "GET, HEAD"},
        )

    def _answer(self, *, body: bool) -> None:
        url = urlsplit(self.path)
        shown = presented_token(self.headers.get("Authorization"), url.query)
        if self.server.token is None and not addressed_locally(self.headers.get("Host")):
            self._send(
                HTTPStatus.FORBIDDEN,
                b"403: without a token the dashboard answers only 127.0.0.1 or localhost\n",
                "text/plain; charset=utf-8",
                body=body,
            )
        elif not allowed(self.server.token, shown):
            self._send(
                HTTPStatus.UNAUTHORIZED,
                _UNAUTHORIZED.encode(),
                "text/html; charset=utf-8",
                extra={"WWW-Authenticate": 'Bearer realm="fedloom dashboard"'},
                body=body,
            )
        elif url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8", body=body)
        elif url.path == "/api/state":
            data = self.server.reading.body()
            self._send(HTTPStatus.OK, data, "application/json", body=body)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"404: not here\n", "text/plain; charset=utf-8")

    def _send(
        self,
        status: HTTPStatus,
        payload: bytes,
        content_type: str,
        *,
        extra: dict[str, str] | None = None,
        body: bool = True,
    ) -> None:
        self.send_response(status)
        for name, value in {**_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        log.debug("dashboard: %s %s", self.address_string(), format % args)


class Dashboard:
    """The read-only dashboard of the aggregator state in ``state_dir``
    (``WORKSPACE/aggregator``): listening once made, serving after :meth:`start` (in a
    daemon thread) or :meth:`serve_forever`.

    Refuses (``ValueError``) to listen on an address other than loopback without a
    ``token``; raises :class:`~fedloom.core.errors.TransportError` where it cannot listen.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        run_name: str | None = None,
        token: str | None = None,
    ) -> None:
        problem = exposure_problem(host, token)
        if problem is not None:
            raise ValueError(problem)
        reading = Reading(lambda: dashboard_view(state_dir, run_name))
        try:
            self._server = DashboardServer((host, port), reading, token)
        except OSError as err:
            raise TransportError(
                f"the dashboard cannot listen on {host}:{port}: {err.strerror or err}",
                hint="pick another port (--port), or stop what listens there",
            ) from err
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open (without the token)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Serve in a daemon thread: it ends with the process, or at :meth:`close`."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fedloom-dashboard", daemon=True
        )
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`close` (from another) or Ctrl-C."""
        self._server.serve_forever()

    def close(self) -> None:
        """Stop serving and let go of the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
