"""Simulated sites' local work on a Ray cluster (``fedloom simulate --backend ray``).

Each :class:`RayWorker` drives one Ray actor (one CPU) that hosts a
:class:`~fedloom.simulation.worker.SiteWorker`, as a :class:`ProcessWorker` drives a
process. Only ``bytes`` and ``str`` cross an actor call: requests and replies are
packed by :func:`fedloom.simulation.pipes.pack` (a JSON header and raw tensor buffers),
which Ray passes as plain bytes (msgpack, not pickle). Ray refers to the actor class
by its import path, so every node needs this fedloom installed.

The workspace reaches the actors in one of two ways: Ray ships a copy of it with the
actors (``runtime_env`` ``working_dir``: what the local head and most clusters use), or,
on a cluster that shares a filesystem with this machine, the actors read it at
:attr:`RayBackend.workspace`.

``ray`` is an optional extra, imported only here and only when a simulation uses it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from fedloom.core.errors import FedloomError, PlanError, TransportError, WorkspaceError
from fedloom.core.weights import Weights
from fedloom.plan import plan_hash, validate_plan
from fedloom.simulation import pipes
from fedloom.simulation.replies import (
    Reply,
    WorkerDied,
    error_reply,
    no_answer,
    raise_reply_error,
    request_timeout,
)
from fedloom.simulation.worker import SiteWorker, Worker

INSTALL_HINT = "pip install 'fedloom[ray]'"
CONNECT_SECONDS = 10.0  # to find the head's port open before handing over to Ray
START_SECONDS = 300.0  # for an actor to be placed, get its runtime_env, load task and data

# Never shipped to the cluster: run folders, keys and certificates, site and
# aggregator state, environments and caches (gitignore patterns; "/" = the top).
NOT_SHIPPED = (
    "/runs/",
    "/pki/",
    "/sites/",
    "/aggregator/",
    "*.key",
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
)


@dataclass(frozen=True, kw_only=True)
class RayBackend:
    """Run the sites' local work on a Ray cluster.

    ``address``: the cluster's head, ``HOST:PORT`` (as ``ray start --head`` prints it)
    or ``auto`` (the cluster this machine is a node of); a Ray Client address
    (``ray://HOST:PORT``) is passed to Ray as it is, untested. ``None`` starts a local
    Ray instance for the run and stops it after.
    ``workspace``: the workspace's path on every node, when the cluster shares a
    filesystem with this machine; ``None`` ships a copy of the workspace with the actors.
    """

    address: str | None = None
    workspace: str | None = None


def require_ray(backend: RayBackend, workers: int | None = None) -> None:
    """Refuse, as command-line problems, what cannot run: Ray not installed, an address
    that is not ``HOST:PORT``, or ``workers`` below 1."""
    problems = []
    try:
        import ray  # noqa: F401
    except ImportError as err:
        problems.append(f"--backend ray: Ray cannot be imported here ({err}); {INSTALL_HINT}")
    if backend.address not in (None, "auto") and _host_port(backend.address) is None:
        problems.append(
            f"--ray-address {backend.address!r}: must be HOST:PORT, as `ray start --head` "
            "prints it (e.g. 10.0.0.5:6379), or auto"
        )
    if workers is not None and workers < 1:
        problems.append(
            f"--workers {workers}: with --backend ray, give 1 or more (each worker is a Ray "
            "actor taking one CPU), or leave it out for one per CPU of the cluster"
        )
    if problems:
        raise PlanError(problems, source="command line")


class SiteActor:
    """The Ray actor: a :class:`SiteWorker` that takes and gives only ``bytes``."""

    def __init__(self, setup: str) -> None:
        try:
            s = json.loads(setup)
            workspace = s["workspace"] or os.getcwd()  # a shipped copy is the actor's cwd
            worker = SiteWorker(workspace, s["plan"], s["attack"])
            digest = worker.plan_hash
            self._worker: SiteWorker | None = worker
            self._ready = pipes.pack({"ok": True, "version": _version(), "plan_hash": digest})
        except Exception as err:  # reported by ready(), so the driver can say why
            self._worker = None
            self._ready = pipes.pack(error_reply(err))

    def ready(self) -> bytes:
        return self._ready

    def call(self, request: bytes) -> bytes:
        try:
            if self._worker is None:
                raise FedloomError("this worker did not start")
            header, weights = pipes.unpack(request)
            reply, out = self._worker.handle(header, weights)
        except Exception as err:
            reply, out = error_reply(err), None
        return pipes.pack(reply, out)


class _Session:
    """fedloom's use of Ray for one simulation. Connects (or starts a local instance)
    only if this process is not connected yet, and then disconnects (stopping that
    instance) when the last of its workers closes."""

    def __init__(self, backend: RayBackend, workspace: str) -> None:
        import ray

        self.ray = ray
        self.owned = not ray.is_initialized()
        if self.owned:
            _connect(ray, backend.address, _job_env(workspace, backend))
        self.actor_class = ray.remote(SiteActor)
        self._users = 0
        self._lock = threading.Lock()

    def retain(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self.owned:
                self.ray.shutdown()


def _connect(ray: Any, address: str | None, runtime_env: dict[str, Any]) -> None:
    common = {"logging_level": logging.WARNING, "runtime_env": runtime_env}
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # ours: no usage reports
        ray.init(address="local", include_dashboard=False, **common)
        return
    if address != "auto":
        _check_reachable(address)
    hint = (
        "check --ray-address (or RAY_ADDRESS), and that the cluster's head is running; a "
        "cluster with token authentication also needs RAY_AUTH_MODE=token and its token "
        "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    )
    try:
        ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
        raise TransportError(
            f"cannot connect to the Ray cluster at {address}: {_reason(err)}", hint=hint
        ) from err
    except SystemExit as err:  # how Ray gives up on a head that stops answering
        raise TransportError(
            f"cannot connect to the Ray cluster at {address}: Ray gave up (exit {err.code})",
            hint=hint,
        ) from None


def _host_port(address: str) -> tuple[str, int] | None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host.strip("[]") or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at ``address``: Ray itself
    keeps retrying an unreachable head for several minutes, then exits the process."""
    where = _host_port(address)
    if where is None:
        return  # refused by require_ray already
    try:
        socket.create_connection(where, timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise TransportError(
            f"cannot reach the Ray cluster at {address}: {err.strerror or err}",
            hint="start its head with `ray start --head --port PORT`, or check --ray-address "
            "(or RAY_ADDRESS)",
        ) from err


def _version() -> str:
    from fedloom.core.version import __version__

    return __version__


def _job_env(workspace: str, backend: RayBackend) -> dict[str, Any]:
    """The Ray job's ``runtime_env``: a copy of the workspace, unless the nodes share it.
    (Ray uploads a local folder only for a whole job, at ``ray.init``.)"""
    if backend.workspace is not None:
        return {}
    return {"working_dir": workspace, "excludes": list(NOT_SHIPPED)}


# Each actor's own runtime_env: one thread for the maths, as in a worker process.
ACTOR_ENV = {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}


def _reason(err: BaseException) -> str:
    """What a Ray error says happened, in one sentence, without Ray's traceback."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    first, dot, _ = last.partition(". ")
    return first + dot.strip() if len(last) > 160 and dot else last


class RayWorker:
    """A :class:`SiteWorker` in a Ray actor. A request that gets no answer within
    ``call_timeout`` seconds for each site it carries, or whose actor dies, fails with
    :class:`WorkerDied`, and the actor is replaced by a fresh one."""

    def __init__(
        self,
        session: _Session,
        setup: str,
        *,
        call_timeout: float | None,
        expected_hash: str,
    ) -> None:
        self._session = session
        self._setup = setup
        self.call_timeout = call_timeout
        self._expected_hash = expected_hash
        self._lock = threading.Lock()
        self._closing = False
        self._closed = False
        session.retain()
        self._start()

    def _start(self) -> None:
        self._actor: Any = self._session.actor_class.options(
            num_cpus=1,
            max_restarts=0,
            scheduling_strategy="SPREAD",
            runtime_env=ACTOR_ENV,
        ).remote(self._setup)
        self._ready = False

    def _kill(self) -> None:
        try:
            self._session.ray.kill(self._actor, no_restart=True)
        except Exception:  # noqa: S110 - gone already, or Ray is shutting down
            pass

    def _replace(self) -> None:
        self._kill()
        if not self._closing:
            self._start()

    def wait_ready(self) -> None:
        if self._ready:
            return
        ray = self._session.ray
        timeout = max(START_SECONDS, self.call_timeout or 0)
        try:
            data = ray.get(self._actor.ready.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError as err:
            self._replace()
            raise WorkerDied(
                f"a Ray worker did not start within {timeout:g} s: the cluster may have no "
                "free CPU for it (each worker takes one)"
            ) from err
        except ray.exceptions.RayError as err:
            self._replace()
            raise WorkerDied(f"a Ray worker died while starting: {_reason(err)}") from err
        header, _ = pipes.unpack(data)
        raise_reply_error(header, "a Ray worker could not start")
        if header["version"] != _version():
            raise FedloomError(
                f"the Ray cluster runs fedloom {header['version']}, this machine "
                f"fedloom {_version()}",
                hint="install the same fedloom on every node of the cluster",
            )
        if header["plan_hash"] != self._expected_hash:
            raise WorkspaceError(
                "the workspace the Ray workers see differs from this one: plan hash "
                f"{header['plan_hash']} there, {self._expected_hash} here",
                hint="--ray-workspace must name this workspace as the nodes see it; a "
                "shipped copy leaves out what .gitignore and .rayignore list",
            )
        self._ready = True

    def call(self, header: dict[str, Any], weights: Weights | None = None) -> Reply:
        ray = self._session.ray
        with self._lock:
            if self._closing:
                raise WorkerDied("the simulation is shutting down")
            self.wait_ready()
            timeout = request_timeout(self.call_timeout, header)  # each site gets its time
            ref = self._actor.call.remote(pipes.pack(header, weights))
            try:
                data = ray.get(ref, timeout=timeout)
            except ray.exceptions.GetTimeoutError as err:
                self._replace()
                raise WorkerDied(no_answer(timeout or 0, header, "its Ray worker")) from err
            except ray.exceptions.RayError as err:
                if self._closing:
                    raise WorkerDied("the simulation is shutting down") from err
                self._replace()
                raise WorkerDied(f"its Ray worker died ({_reason(err)}); it was replaced") from err
        try:
            return pipes.unpack(data)
        except (ValueError, FedloomError) as err:
            raise WorkerDied(f"a Ray worker sent a reply that cannot be read: {err}") from err

    def abort(self) -> None:
        """Stop now, even in the middle of a request (which then fails)."""
        self._closing = True
        self._kill()

    def close(self) -> None:
        self._closing = True
        self._kill()
        if not self._closed:
            self._closed = True
            self._session.release()


def start_ray_workers(
    backend: RayBackend,
    workspace: str,
    plan_json: str,
    attack_json: str,
    *,
    workers: int | None,
    sites_per_round: int,
    call_timeout: float | None,
) -> list[Worker]:
    """Connect to the cluster (or start a local Ray instance) and start ``workers``
    actors (``None``: one per CPU of the cluster), at most ``sites_per_round``, each
    ready to serve. Closing the last of them disconnects from Ray again."""
    require_ray(backend, workers)
    session = _Session(backend, workspace)
    started: list[Worker] = []
    session.retain()  # held while starting, so a failure below still disconnects once
    try:
        cpus = int(session.ray.cluster_resources().get("CPU", 0))
        count = min(cpus if workers is None else workers, sites_per_round)
        if count < 1 or count > cpus:
            raise FedloomError(
                f"{count} Ray worker(s) wanted, but the Ray cluster has {cpus} CPU(s), one "
                "per worker",
                hint="lower --workers, or add nodes to the cluster",
            )
        digest = plan_hash(validate_plan(json.loads(plan_json)), workspace)
        setup = json.dumps(
            {"workspace": backend.workspace, "plan": plan_json, "attack": attack_json}
        )
        for _ in range(count):
            started.append(
                RayWorker(session, setup, call_timeout=call_timeout, expected_hash=digest)
            )
        for w in started:
            w.wait_ready()
    except BaseException:
        for w in started:
            w.close()
        raise
    finally:
        session.release()
    return started
