"""Who may see the dashboard: anyone on this machine by default; with a token, only who
shows it.

The dashboard binds 127.0.0.1 unless told otherwise. Bound to any other address it must
have a token (:func:`exposure_problem`), and then every request, the page's and the
API's, carries it: ``Authorization: Bearer TOKEN``, or ``?token=TOKEN`` on the URL (the
page's script sends the header after that). A request without it gets a 401 whose body
holds nothing of the run.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

TOKEN_ENV = "FEDLOOM_DASHBOARD_TOKEN"
"""The environment variable a token may come from (``--token-file`` wins)."""

MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_problem(host: str, token: str | None) -> str | None:
    """Why the dashboard may not listen on ``host`` with ``token``, or None."""
    if token is None and not is_loopback(host):
        return (
            f"the dashboard would be open to anyone who can reach {host}: it needs a token "
            f"to listen on an address other than 127.0.0.1 (--token-file FILE, or {TOKEN_ENV})"
        )
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        return f"the dashboard's token is too short: at least {MIN_TOKEN_CHARS} characters"
    return None


def token_from(token_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The token from ``token_file`` (its text, stripped) or else from ``environ``'s
    ``FEDLOOM_DASHBOARD_TOKEN``; None where neither gives one. Raises OSError where
    the file cannot be read."""
    if token_file is not None:
        return token_file.read_text(encoding="utf-8").strip()
    value = environ.get(TOKEN_ENV, "").strip()
    return value or None


def presented_token(authorization: str | None, query: str) -> str | None:
    """The token a request shows: its ``Authorization: Bearer`` header, else its
    ``token`` query parameter."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    values = parse_qs(query).get("token")
    return values[0] if values else None


def addressed_locally(host_header: str | None) -> bool:
    """Whether a request's ``Host`` names this machine (``127.0.0.1``, ``localhost``,
    ``[::1]``, any port). Without a token the dashboard answers only those: a web page
    elsewhere whose own name is made to point at 127.0.0.1 (DNS rebinding) gets nothing."""
    try:
        name = urlsplit(f"//{host_header or ''}").hostname
    except ValueError:
        return False
    return name is not None and is_loopback(name)


def allowed(token: str | None, presented: str | None) -> bool:
    """Whether a request that shows ``presented`` may see a dashboard with ``token``."""
    if token is None:
        return True
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), token.encode())
