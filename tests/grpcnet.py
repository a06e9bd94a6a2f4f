"""A real gRPC federation on loopback for tests: the project's own PKI, mutual TLS.

:class:`GrpcTestTransport` puts an aggregator service behind a :class:`GrpcServer` on
``127.0.0.1`` with certificates made by :func:`fedloom.pki.provision`, and hands out
:class:`GrpcConnection` objects, each holding the certificate of the site it connects
as. Besides the plan's sites it certifies a few names the CA signed but the plan does
not list (``mallory``), as a CA whose plan changed would have.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedloom.pki import (
    RevocationList,
    accept_certificate,
    provision,
    request_certificate,
    server_credentials,
    sign_request,
    site_credentials,
)
from fedloom.transport.grpc import ClientSettings, GrpcConnection, GrpcServer, ServerSettings

PLAN_HASH = "contract-plan-hash"
OUTSIDERS = ("mallory",)


def certify(workspace: Path, name: str) -> Path:
    """A certificate for ``name`` from the workspace's CA, whatever the plan says."""
    state = workspace / "sites" / name
    csr, _ = request_certificate(state, name)
    cert, _ = sign_request(workspace / "pki", csr.read_bytes(), allowed=[name])
    accept_certificate(state, cert, (workspace / "pki" / "ca.crt").read_bytes())
    return state


class GrpcTestTransport:
    """``connect(site)`` gives a :class:`GrpcConnection` over real mutual TLS."""

    def __init__(
        self,
        service: Any,
        *,
        roster: tuple[str, ...] | None = None,
        plan_hash: str = PLAN_HASH,
        workspace: Path | None = None,
    ) -> None:
        roster = tuple(roster or service.config.roster)
        self._own_dir = workspace is None
        self.workspace = workspace or Path(tempfile.mkdtemp(prefix="fedloom-grpc-"))
        self.states = provision(self.workspace, roster)
        for name in OUTSIDERS:
            self.states[name] = certify(self.workspace, name)
        self.plan_hash = plan_hash
        pki = self.workspace / "pki"
        credentials = server_credentials(pki)
        self.server = GrpcServer(
            service,
            credentials,
            ServerSettings(
                address="127.0.0.1:0",
                plan_hash=plan_hash,
                federation="contract",
                rounds=getattr(getattr(service, "config", None), "rounds", 1),
                roster=frozenset(roster),
                heartbeat_seconds=1.0,
            ),
            revocations=RevocationList(pki / "crl.pem", credentials.ca_pem),
        )
        self.port = self.server.start()
        self.traffic = self.server.traffic
        self.connections: list[GrpcConnection] = []

    def settings(self, site: str, **changes: Any) -> ClientSettings:
        values: dict[str, Any] = {
            "address": f"127.0.0.1:{self.port}",
            "site": site,
            "plan_hash": self.plan_hash,
            "connect_seconds": 5.0,
            "backoff_base": 0.05,
            "backoff_max": 0.5,
        }
        values.update(changes)
        return ClientSettings(**values)

    def connect(
        self,
        site: str,
        *,
        state: Path | None = None,
        name: str | None = None,
        same_process: bool = False,
        **changes: Any,
    ) -> GrpcConnection:
        """A connection holding ``site``'s certificate (or the one in ``state``), saying
        it is ``name`` (default: ``site``). It is another collaborator process (a new
        session, which replaces the site's earlier one at its first call) unless
        ``same_process``: then it shares the session of the first connection made for
        ``site``, as a second channel of that process would."""
        credentials = site_credentials(state or self.states.get(site) or self.states[OUTSIDERS[0]])
        session = None
        if same_process:
            session = next(c.session_id for c in self.connections if c.site == (name or site))
        conn = GrpcConnection(
            credentials, self.settings(name or site, **changes), session_id=session
        )
        self.connections.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.connections:
            conn.stop.set()
            conn.close()
        self.server.stop(grace=0.5)
        if self._own_dir:
            shutil.rmtree(self.workspace, ignore_errors=True)
