"""A real site: the collaborator process that trains on data that never leaves.

:func:`participate` loads the plan and the task the data owner approved, opens one
mutual-TLS channel to the aggregator (outbound only), and works until the aggregator
says the federation has finished. Heartbeats go out from their own thread. A lost
aggregator is waited for with backoff; a refusal (another CA, a revoked certificate,
another plan) ends the process with the reason.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedloom.clock import FaultPoints
from fedloom.collaborator import Collaborator
from fedloom.data import train_val_split
from fedloom.errors import (
    AccessDenied,
    AggregatorLost,
    PlanError,
    TransportError,
    WorkspaceError,
)
from fedloom.pki import site_credentials
from fedloom.pki.common import site_state_dir
from fedloom.plan import Plan, plan_hash
from fedloom.records import Instruction, SiteAnswer
from fedloom.rng import generator
from fedloom.runtime.executor import execute
from fedloom.runtime.sitedata import DataSource
from fedloom.tasks.base import SiteData, Task
from fedloom.tasks.loader import load_task
from fedloom.transport.grpc import ClientSettings, GrpcConnection
from fedloom.transport.messages import Heartbeat
from fedloom.weights import Weights

log = logging.getLogger("fedloom.collaborator")


@dataclass(frozen=True, kw_only=True)
class SiteOptions:
    name: str
    address: str  # host:port of the aggregator
    state_dir: Path | None = None  # default: WORKSPACE/sites/NAME
    data: Path | None = None  # an .npz of this site's data; default: its share of the plan's
    server_name: str | None = None
    connect_seconds: float | None = None  # give up reaching the aggregator after this
    threads: int = 1  # torch threads


@dataclass
class SiteProgress:
    """What the collaborator did, for its progress line and its exit summary."""

    rounds_done: int = 0  # training rounds whose update the aggregator accepted
    failed: set[int] = field(default_factory=set)  # rounds not answered, or answers refused
    evaluated: bool = False  # the final model was evaluated here
    current: int = 0
    last: str = ""

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
    faults: FaultPoints | None = None,
) -> SiteProgress:
    """Take part in the federation until it finishes; returns what this site did.

    Raises :class:`AccessDenied` when the aggregator refuses this site,
    :class:`AggregatorLost` when it cannot be reached for ``connect_seconds``, and
    :class:`TransportError` when it stopped before the federation completed.
    """
    ws = Path(workspace).resolve()
    stop = stop or threading.Event()
    state_dir = options.state_dir or site_state_dir(ws, options.name)
    credentials = site_credentials(state_dir)
    digest = plan_hash(plan, ws)
    task = load_task(ws, plan.task)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(options.threads)
    data, index, num_classes = _site_data(ws, plan, task, options)
    settings = ClientSettings(
        address=options.address,
        site=options.name,
        plan_hash=digest,
        server_name=options.server_name,
        connect_seconds=options.connect_seconds,
        stream_seconds=max(60.0, 2 * plan.deadline.round_seconds),
    )
    connection = GrpcConnection(credentials, settings, stop=stop)
    progress = SiteProgress()

    def report(line: str, *, failed: bool = False) -> None:
        progress.last = line
        (log.warning if failed else log.info)(line)
        if on_progress is not None:
            on_progress(progress)

    def runner(instruction: Instruction, weights: Weights) -> SiteAnswer:
        progress.current = instruction.round
        report(f"round {instruction.round}: {instruction.kind.value} on local data")
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
            )
        except Exception as err:  # reported to the aggregator by the collaborator too
            progress.failed.add(instruction.round)
            why = traceback.format_exception_only(err)[-1].strip()
            report(f"round {instruction.round}: the task failed: {why}", failed=True)
            raise

    try:
        welcome = connection.open()
        log.info(
            "joined federation %r as %s (rounds: %d)",
            welcome.federation,
            options.name,
            welcome.rounds,
        )
        beats = threading.Thread(
            target=_heartbeats,
            args=(connection, welcome.heartbeat_seconds, progress, stop),
            name="fedloom-heartbeat",
            daemon=True,
        )
        beats.start()
        collaborator = Collaborator(connection, runner, faults=faults)
        while not stop.is_set():
            try:
                if not collaborator.step():
                    break
            except (AccessDenied, AggregatorLost):
                raise
            except TransportError as err:
                working = collaborator.current  # None: it was only asking for work
                if working is not None:
                    progress.failed.add(working.round)
                report(f"round {progress.current}: {err.message}", failed=working is not None)
                continue
            receipt, collaborator.last_receipt = collaborator.last_receipt, None
            if receipt is None or receipt.round != progress.current:
                continue
            if not receipt.accepted:
                progress.failed.add(receipt.round)
                report(f"round {receipt.round}: answer refused: {receipt.reason}", failed=True)
            elif receipt.bytes_received:
                progress.rounds_done += 1
                progress.failed.discard(receipt.round)  # answered in the end (a retry)
                report(f"round {receipt.round}: update accepted ({receipt.bytes_received} bytes)")
            else:
                progress.evaluated = True
                progress.failed.discard(receipt.round)
                report(f"round {receipt.round}: evaluation of the final model accepted")
        finished = collaborator.finished
        if finished is not None and not finished.config.get("completed", True):
            raise TransportError(
                "the aggregator stopped before the federation completed (interrupted or failed)",
                hint="start this collaborator again once the aggregator is back",
            )
    finally:
        stop.set()
        connection.close()
    return progress


def _heartbeats(
    connection: GrpcConnection, every: float, progress: SiteProgress, stop: threading.Event
) -> None:
    while not stop.wait(every):
        try:
            reply = connection.heartbeat(Heartbeat(progress.current))
        except Exception as err:  # noqa: BLE001 - a missed beat is logged, never fatal
            log.debug("heartbeat: %s", err)
            continue
        if reply.finished:
            return


def _site_data(ws: Path, plan: Plan, task: Task, options: SiteOptions) -> tuple[SiteData, int, int]:
    """This site's data, its index in the roster (-1 if not in it) and the class count."""
    index = plan.roster.index(options.name) if options.name in plan.roster else -1
    source = DataSource(plan, ws, task)
    if options.data is not None:
        data = load_site_file(options.data, plan, options.name)
        return data, index, source.num_classes
    if index < 0:
        raise PlanError(
            [f"site {options.name!r} is not one of the plan's sites: {', '.join(plan.roster)}"],
            source=str(ws / "federation.yaml"),
        )
    return source.site_data(options.name), index, source.num_classes


def load_site_file(path: Path, plan: Plan, site: str) -> SiteData:
    """A site's data from an ``.npz`` file: ``x`` and ``y`` (split into training and
    validation by the plan's ``data.val_fraction``), or ``x_train``, ``y_train``,
    ``x_val``, ``y_val``. Loaded with ``allow_pickle=False``."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise WorkspaceError(
            f"cannot read the site's data {path}: {err}",
            hint="--data takes an .npz file with arrays x and y "
            "(or x_train, y_train, x_val, y_val)",
        ) from err
    if {"x_train", "y_train", "x_val", "y_val"} <= arrays.keys():
        return SiteData(arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"])
    if {"x", "y"} <= arrays.keys():
        x, y = arrays["x"], arrays["y"]
        rng = generator(plan.seed, 0, site, "val-split")
        train, val = train_val_split(np.arange(len(y)), plan.data.val_fraction, rng)
        return SiteData(x[train], y[train], x[val], y[val])
    raise WorkspaceError(
        f"{path} holds {sorted(arrays)}; expected x and y, or x_train, y_train, x_val, y_val"
    )
