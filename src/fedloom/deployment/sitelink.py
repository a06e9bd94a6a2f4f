"""The site's link to the aggregator, once its channel is open and when it cannot be.

:func:`work` steps the collaborator until the aggregator says the federation
completed, waiting with backoff for one that stopped before it did;
:func:`heartbeats` beats from their own thread; :func:`aggregator_certificate`
checks and keeps the certificate the aggregator's Welcome carries; and a site that
cannot take part tells the aggregator that it withdraws (:func:`tell_withdrawal`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from cryptography import x509
from cryptography.x509 import Certificate

from fedloom.collaborator import Collaborator, withdraw
from fedloom.core.errors import (
    AccessDenied,
    AggregatorLost,
    FederationCancelled,
    FedloomError,
    TransportError,
)
from fedloom.deployment.siteprogress import Reporter, SiteProgress, record_answers
from fedloom.deployment.waiting import WaitNotices, federation_completed
from fedloom.pki.common import SERVER_CERT, write_atomic
from fedloom.pki.credentials import Credentials
from fedloom.privacy.audit import AuditLog
from fedloom.privacy.audit_records import AUDIT_LOG
from fedloom.privacy.signing import certificate_from_pem
from fedloom.transport.grpc import ClientSettings, GrpcConnection
from fedloom.transport.messages import Heartbeat

log = logging.getLogger("fedloom.collaborator")
WITHDRAW_SECONDS = 60.0  # at most this long a refused site tries to tell the aggregator
STOPPING_POLL_MAX = 2.0  # seconds between asks of an aggregator that says it stopped


def work(
    collaborator: Collaborator,
    settings: ClientSettings,
    notices: WaitNotices,
    progress: SiteProgress,
    report: Reporter,
    stop: threading.Event,
) -> None:
    """Step ``collaborator`` until the aggregator says the federation completed (or
    ``stop`` is set). An aggregator that says it stopped before is asked again, with
    backoff, until it is gone and the connection waits for it to be back; a failed
    exchange is reported and the work goes on. Raises :class:`AccessDenied`,
    :class:`AggregatorLost` and :class:`FederationCancelled`."""
    stops = 0  # "stopped" answers in a row from an aggregator on its way out
    while not stop.is_set():
        try:
            outcome = collaborator.step()
            if outcome.finished is not None:
                if federation_completed(outcome.finished):
                    break
                notices.stopped()
                # it answers so until it is gone (it lingers a few seconds to tell
                # every site); then the connection waits for it to be back
                delay = min(STOPPING_POLL_MAX, settings.backoff_base * 2**stops)
                stops += 1
                stop.wait(delay)  # backoff
                continue
            if stops:
                notices(None)  # another aggregator process answers: it is back
            stops = 0
        except (AccessDenied, AggregatorLost, FederationCancelled):
            raise
        except TransportError as err:
            working = collaborator.current  # None: it was only asking for work
            if working is not None:
                progress.failed.add(working.round)
            report(f"round {progress.current}: {err.message}", failed=working is not None)
            continue
        record_answers(outcome, progress, report)


def aggregator_certificate(pem: bytes, credentials: Credentials, state_dir: Path) -> Certificate:
    """The aggregator's certificate from its Welcome, checked against the federation's
    CA, and kept as STATE/aggregator.crt (``fedloom audit verify`` checks receipts with
    it)."""
    if not pem:
        raise AccessDenied(
            "the aggregator sent no certificate: it cannot sign its models and receipts",
            hint="run the same fedloom version on the aggregator",
        )
    ca = x509.load_pem_x509_certificate(credentials.ca_pem)
    certificate = certificate_from_pem(pem, ca)
    path = state_dir / SERVER_CERT
    if not path.is_file() or path.read_bytes() != pem:
        write_atomic(path, pem)
    return certificate


def tell_withdrawal(
    credentials: Credentials,
    settings: ClientSettings,
    err: FedloomError,
    state_dir: Path,
    stop: threading.Event,
) -> bool:
    """Say Hello, then tell the aggregator that this site withdraws because of ``err``
    (:func:`~fedloom.collaborator.withdraw`), trying for ``--give-up-after`` seconds but
    no longer than :data:`WITHDRAW_SECONDS`; True once it was told. A site not told
    leaves the aggregator waiting for it each round until the deadline, as a site never
    started would."""
    reason = " ".join(line.strip() for line in err.message.splitlines())
    log.error("this site cannot take part: %s", err)
    limit = min(settings.connect_seconds or WITHDRAW_SECONDS, WITHDRAW_SECONDS)
    connection = GrpcConnection(
        credentials, dataclasses.replace(settings, connect_seconds=limit), stop=stop
    )
    try:
        connection.open()
        withdraw(connection, reason, audit=AuditLog(state_dir / AUDIT_LOG))
    except FedloomError as failed:
        log.warning(
            "could not tell the aggregator that this site withdraws: %s; it waits for this "
            "site each round until the round's deadline",
            failed.message,
        )
        return False
    finally:
        connection.close()
    log.warning("told the aggregator that this site withdraws: %s", reason)
    return True


def heartbeats(
    connection: GrpcConnection, every: float, progress: SiteProgress, stop: threading.Event
) -> None:
    # beats on after the aggregator says it finished: it may have stopped before the
    # federation completed, and a restarted one hears the site again (the process
    # stops the beats when it ends)
    while not stop.wait(every):
        try:
            connection.heartbeat(Heartbeat(progress.current))
        except Exception as err:  # noqa: BLE001 - a missed beat is logged, never fatal
            log.debug("heartbeat: %s", err)
