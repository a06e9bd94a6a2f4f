"""A real site: the collaborator process that trains on data that never leaves.

:func:`participate` loads the plan and the task the data owner approved, opens one
mutual-TLS channel to the aggregator (outbound only), and works until the aggregator
says the federation has completed, or was cancelled. Heartbeats go out from their own
thread. A lost aggregator is waited for with backoff, and so is one that stopped
before the federation completed (interrupted, failed: it resumes the run when started
again); each change of what the site waits for, and why, is said on the screen. A
refusal (another CA, a revoked certificate, another plan) ends the process with the
reason.

Its parts: the policy and budget checked at start (:mod:`~fedloom.deployment.sitepolicy`),
the site's own data (:mod:`~fedloom.deployment.siteload`), the link to the aggregator
(:mod:`~fedloom.deployment.sitelink`: the work loop, heartbeats, withdrawal) and what the
site did, as its screen shows it (:mod:`~fedloom.deployment.siteprogress`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedloom.collaborator import Collaborator
from fedloom.compression.site import site_compression
from fedloom.core.clock import FaultPoints
from fedloom.core.errors import DataError, DeviceError, FedloomError, StateError
from fedloom.core.records import Instruction, SiteAnswer
from fedloom.core.weights import Weights
from fedloom.deployment.sitelink import aggregator_certificate, heartbeats, tell_withdrawal, work
from fedloom.deployment.siteload import load_site_data
from fedloom.deployment.sitepolicy import enforce_policy, site_budget, site_policy_files
from fedloom.deployment.siteprogress import Reporter, SiteProgress
from fedloom.deployment.waiting import WaitNotices
from fedloom.pki import site_credentials
from fedloom.pki.common import check_name, site_state_dir
from fedloom.pki.site import check_own_certificate
from fedloom.plan import Plan, plan_hash
from fedloom.plan.tasks import plan_task
from fedloom.privacy.audit import AuditLog
from fedloom.privacy.audit_records import AUDIT_LOG
from fedloom.privacy.final_model import keep_final_model
from fedloom.privacy.identity import SiteIdentity
from fedloom.privacy.policy import filter_metrics
from fedloom.privacy.published import model_checker
from fedloom.privacy.site import site_privacy
from fedloom.runtime.executor import dp_sgd_of, execute, site_env
from fedloom.runtime.tracebacks import one_line, task_traceback
from fedloom.store.locks import LockBusy, hold_lock
from fedloom.transport.grpc import ClientSettings, GrpcConnection
from fedloom.transport.messages import ModelHeader
from fedloom.workspace import WorkspaceCode

log = logging.getLogger("fedloom.collaborator")
LOCK_FILE = "collaborator.lock"
TASK_STATE = "task"  # STATE/task: the task's own folder (optimiser state, local tensors)


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
    task = plan_task(code, plan)
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
        data, index = load_site_data(ws, plan, task, options.name, options.data, env)
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
    report = Reporter(progress, on_progress)

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
            target=heartbeats,
            args=(connection, welcome.heartbeat_seconds, progress, stop),
            name="fedloom-heartbeat",
            daemon=True,
        )
        beats.start()
        aggregator_cert = aggregator_certificate(welcome.certificate, credentials, state_dir)
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
        work(collaborator, settings, notices, progress, report, stop)
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
