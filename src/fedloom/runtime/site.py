"""A real site: the collaborator process that trains on data that never leaves.

:func:`participate` loads the plan and the task the data owner approved, opens one
mutual-TLS channel to the aggregator (outbound only), and works until the aggregator
says the federation has completed, or was cancelled. Heartbeats go out from their own
thread. A lost aggregator is waited for with backoff, and so is one that stopped
before the federation completed (interrupted, failed: it resumes the run when started
again); each change of what the site waits for, and why, is said on the screen. A
refusal (another CA, a revoked certificate, another plan) ends the process with the
reason.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.x509 import Certificate

from fedloom.collaborator import Collaborator, withdraw
from fedloom.compression.site import site_compression
from fedloom.core.clock import FaultPoints
from fedloom.core.errors import (
    AccessDenied,
    AggregatorLost,
    DataError,
    DeviceError,
    FederationCancelled,
    FedloomError,
    StateError,
    TransportError,
)
from fedloom.core.records import Instruction, SiteAnswer
from fedloom.core.weights import Weights
from fedloom.pki import site_credentials
from fedloom.pki.common import SERVER_CERT, check_name, site_state_dir, write_atomic
from fedloom.pki.credentials import Credentials
from fedloom.pki.site import check_own_certificate
from fedloom.plan import Plan, plan_hash
from fedloom.privacy.audit import AUDIT_LOG, AuditLog
from fedloom.privacy.final_model import keep_final_model
from fedloom.privacy.identity import SiteIdentity
from fedloom.privacy.policy import filter_metrics
from fedloom.privacy.published import model_checker
from fedloom.privacy.signing import certificate_from_pem
from fedloom.privacy.site import site_privacy
from fedloom.runtime.executor import dp_sgd_of, execute, site_env
from fedloom.runtime.siteload import load_site_data
from fedloom.runtime.sitepolicy import enforce_policy, site_budget, site_policy_files
from fedloom.runtime.tracebacks import one_line, task_traceback
from fedloom.runtime.waiting import WaitNotices, federation_completed
from fedloom.store.locks import LockBusy, hold_lock
from fedloom.tasks.loader import load_task
from fedloom.transport.grpc import ClientSettings, GrpcConnection
from fedloom.transport.messages import Heartbeat, ModelHeader
from fedloom.workspace import WorkspaceCode

log = logging.getLogger("fedloom.collaborator")
LOCK_FILE = "collaborator.lock"
TASK_STATE = "task"  # STATE/task: the task's own folder (optimiser state, local tensors)
WITHDRAW_SECONDS = 60.0  # at most this long a refused site tries to tell the aggregator
STOPPING_POLL_MAX = 2.0  # seconds between asks of an aggregator that says it stopped


@dataclass(frozen=True, kw_only=True)
class SiteOptions:
    name: str
    address: str  # host:port of the aggregator
    state_dir: Path | None = None  # default: WORKSPACE/sites/NAME
    # this site's data: a file or folder the task's data function reads, or an .npz of
    # arrays; default: its share of the plan's built-in dataset
    data: Path | None = None
    device: str | None = None  # where its torch code runs; default: the plan's training.device
    server_name: str | None = None
    connect_seconds: float | None = None  # give up reaching the aggregator after this
    threads: int = 1  # torch threads
    policy: Path | None = None  # the data owner's policy; default: STATE/policy.yaml if any


@dataclass
class SiteProgress:
    """What the collaborator did, for its progress line and its exit summary."""

    # training rounds whose update the aggregator accepted (once each: a round that
    # runs again after the aggregator's restart is asked for, and accepted, again)
    accepted: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)  # rounds not answered, or answers refused
    evaluated: bool = False  # the final model was evaluated here
    final_model: Path | None = None  # where this site kept it (STATE/final/<run>.safetensors)
    current: int = 0
    last: str = ""
    # the traceback of the failure ``last`` reports, when the task's own code raised;
    # kept at the site (its log; the screen with --verbose), never sent
    traceback: str = ""

    @property
    def rounds_done(self) -> int:
        return len(self.accepted)

    @property
    def rounds_failed(self) -> int:
        return len(self.failed)


def participate(
    workspace: str | Path,
    plan: Plan,
    options: SiteOptions,
    *,
    stop: threading.Event | None = None,
    on_progress: Callable[[SiteProgress], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    faults: FaultPoints | None = None,
) -> SiteProgress:
    """Take part in the federation until it completes; returns what this site did.
    ``on_notice`` is told, once per change, what the site waits for and why (the
    aggregator unreachable, stopped), that it joined, and that the aggregator answers
    again.

    An aggregator that stops before the federation completed (Ctrl-C, a failure) is
    waited for, as one that crashed: started again, it resumes the run. Raises
    :class:`AccessDenied` when the aggregator refuses this site,
    :class:`AggregatorLost` when it cannot be reached for ``connect_seconds``, and
    :class:`FederationCancelled` when its operator cancelled the federation.
    """
    ws = Path(workspace).resolve()
    stop = stop or threading.Event()
    check_name(options.name)  # before its name builds any path
    state_dir = options.state_dir or site_state_dir(ws, options.name)
    lock = lock_site_state(state_dir)  # before anything in it is read or written
    try:
        notices = WaitNotices(options.address, options.connect_seconds, on_notice)
        return _participate(ws, plan, options, state_dir, stop, on_progress, notices, faults)
    finally:
        lock.close()


def _participate(
    ws: Path,
    plan: Plan,
    options: SiteOptions,
    state_dir: Path,
    stop: threading.Event,
    on_progress: Callable[[SiteProgress], None] | None,
    notices: WaitNotices,
    faults: FaultPoints | None,
) -> SiteProgress:
    code = WorkspaceCode.read(ws)  # hashed here, and loaded below from these same bytes
    digest = plan_hash(plan, code)
    # The data owner's policy is checked first: before the task's code is loaded, any
    # data is read or anything is sent. A plan that breaks it never touches the data.
    policy_files = site_policy_files(ws, options.name, state_dir, options.policy)
    policy = enforce_policy(plan, digest, policy_files)
    credentials = site_credentials(state_dir)
    check_own_certificate(state_dir, credentials)  # not blamed on the aggregator later
    task = load_task(code, plan.task)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(options.threads)
    settings = ClientSettings(
        address=options.address,
        site=options.name,
        plan_hash=digest,
        server_name=options.server_name,
        connect_seconds=options.connect_seconds,
        stream_seconds=max(60.0, 2 * plan.deadline.round_seconds),
    )
    # The task's own folder, kept across rounds and restarts (nothing here deletes it).
    task_state = state_dir / TASK_STATE
    task_state.mkdir(mode=0o700, exist_ok=True)
    try:
        env = site_env(plan, device=options.device, data_path=options.data, state_dir=task_state)
        data, index, num_classes = load_site_data(ws, plan, task, options.name, options.data, env)
    except (DataError, DeviceError) as err:
        # Refused alone: the aggregator hears why and stops waiting for this site.
        told = tell_withdrawal(credentials, settings, err, state_dir, stop)
        err.message += (
            "\n  the aggregator was told that this site withdraws: the others carry on"
            if told
            else "\n  the aggregator could not be told that this site withdraws (see the log)"
        )
        raise
    connection = GrpcConnection(credentials, settings, stop=stop, on_wait=notices)
    progress = SiteProgress()

    def report(line: str, *, failed: bool = False, trace: str = "") -> None:
        progress.last, progress.traceback = line, trace
        (log.warning if failed else log.info)(line + (f"\n{trace}" if trace else ""))
        if on_progress is not None:
            on_progress(progress)

    def runner(instruction: Instruction, weights: Weights) -> SiteAnswer:
        progress.current = instruction.round
        report(f"round {instruction.round}: {instruction.kind.value} on local data")
        dp_sgd, rounds_selected = dp_sgd_of(plan, options.name, instruction.round)
        try:
            return execute(
                task,
                instruction,
                weights,
                data,
                site=options.name,
                index=index,
                plan_seed=plan.seed,
                num_classes=num_classes,
                dp_sgd=dp_sgd,
                rounds_selected=rounds_selected,
                env=env,
            )
        except Exception as err:  # reported to the aggregator by the collaborator too
            progress.failed.add(instruction.round)
            # the aggregator gets the one line; the traceback (it may show the site's
            # data) stays here, in the site's log
            trace = task_traceback(err)
            report(
                f"round {instruction.round}: the task failed: {one_line(err)}",
                failed=True,
                trace=trace,
            )
            raise

    try:
        welcome = connection.open()
        log.info(
            "joined federation %r as %s (rounds: %d)",
            welcome.federation,
            options.name,
            welcome.rounds,
        )
        notices.say(
            f"site {options.name} joined {welcome.federation} at {options.address} "
            f"(rounds: {welcome.rounds})"
        )
        beats = threading.Thread(
            target=_heartbeats,
            args=(connection, welcome.heartbeat_seconds, progress, stop),
            name="fedloom-heartbeat",
            daemon=True,
        )
        beats.start()
        aggregator_cert = _aggregator_certificate(welcome.certificate, credentials, state_dir)
        metric_filter = None
        if policy is not None:
            kept_policy = policy

            def metric_filter(m: Mapping[str, float]) -> tuple[dict[str, float], tuple[str, ...]]:
                return filter_metrics(kept_policy, m)

        def keep_final(header: ModelHeader, weights: Weights) -> None:
            try:
                progress.final_model = keep_final_model(
                    state_dir,
                    header,
                    weights,
                    plan_hash=digest,
                    site=options.name,
                    aggregator_cert=welcome.certificate,
                    model_codec=plan.compression.model,
                )
            except (FedloomError, OSError) as err:  # the evaluation goes on without it
                report(f"round {header.round}: the final model was not kept: {err}", failed=True)
                return
            log.info("the final model is kept in %s", progress.final_model)

        collaborator = Collaborator(
            connection,
            runner,
            faults=faults,
            privacy=site_privacy(
                plan,
                options.name,
                metric_filter,
                site_budget(plan, digest, policy, state_dir),
                # secure aggregation's keys are signed with this site's certificate key
                identity=SiteIdentity.from_credentials(options.name, credentials),
            ),
            audit=AuditLog(state_dir / AUDIT_LOG),
            check_model=model_checker(aggregator_cert),
            # topk's residual lives as long as this process: a restart drops it
            compression=site_compression(plan),
            keep_final=keep_final,
        )
        stops = 0  # "stopped" answers in a row from an aggregator on its way out
        while not stop.is_set():
            try:
                if not collaborator.step():
                    last_word, collaborator.finished = collaborator.finished, None
                    if last_word is None or federation_completed(last_word):
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
            refused, collaborator.last_failure = collaborator.last_failure, None
            if refused is not None and refused[0] not in progress.failed:
                # reported to the aggregator already: a refused model, the policy, the budget
                progress.failed.add(refused[0])
                report(f"round {refused[0]}: not answered: {refused[1]}", failed=True)
            receipt, collaborator.last_receipt = collaborator.last_receipt, None
            if receipt is None or receipt.round != progress.current:
                continue
            if not receipt.accepted:
                progress.failed.add(receipt.round)
                report(f"round {receipt.round}: answer refused: {receipt.reason}", failed=True)
            elif receipt.bytes_received:
                progress.accepted.add(receipt.round)
                progress.failed.discard(receipt.round)  # answered in the end (a retry)
                report(f"round {receipt.round}: update accepted ({receipt.bytes_received} bytes)")
            else:
                progress.evaluated = True
                progress.failed.discard(receipt.round)
                report(f"round {receipt.round}: evaluation of the final model accepted")
    finally:
        stop.set()
        connection.close()
    return progress


def lock_site_state(state_dir: Path) -> IO[str]:
    """Hold the site state folder's lock (``STATE/collaborator.lock``, an ``fcntl``
    lock the OS releases when the process ends, however it ends) until the returned
    file is closed. A second collaborator on the same folder is refused with
    :class:`StateError` naming the folder and the process that holds it: two would
    interleave the audit log and double-count the privacy budget."""
    state_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"
    try:
        return hold_lock(state_dir / LOCK_FILE, holder)
    except LockBusy as busy:
        raise StateError(
            f"the site state folder {state_dir} is in use by another collaborator "
            f"({busy.holder or 'a process that has not written its id yet'})",
            hint="one collaborator per state folder: stop that process first, or give this "
            "one its own folder with --state (and its own certificate: one site, one "
            "collaborator)",
        ) from None


def _aggregator_certificate(pem: bytes, credentials: Credentials, state_dir: Path) -> Certificate:
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


def _heartbeats(
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
