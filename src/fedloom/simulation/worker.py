"""Worker processes of the simulation: where simulated sites do their local work.

Each worker loads the task module and the dataset once, builds the model once, runs
torch single-threaded, and serves one request at a time from its driver thread.
:class:`SiteWorker` holds the logic; :class:`ProcessWorker` runs it in a child
process, :class:`LocalWorker` in the calling process (``--workers 0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from fedloom.core.errors import (
    TaskError,
    WorkspaceError,
)
from fedloom.core.records import DPSGDSettings, EvalOutput, Instruction, SiteAnswer
from fedloom.core.weights import Weights, copy_weights, read_only
from fedloom.figures import metrics_to_json
from fedloom.plan import plan_hash, validate_plan
from fedloom.plan.tasks import plan_task
from fedloom.runtime.devices import limit_memory, release_memory, resolve_device
from fedloom.runtime.executor import SiteEnv, dp_sgd_of, execute, outside_rounds, site_env
from fedloom.runtime.sitedata import DataSource
from fedloom.simulation import pipes
from fedloom.simulation.attacked import AttackedTask
from fedloom.simulation.replies import (
    Reply,
    WorkerDied,
    error_reply,
    no_answer,
    raise_reply_error,
    request_timeout,
)
from fedloom.simulation.workerops import (
    WorkerOp,
    attack_from_json,
    instruction_from_json,
    op_of,
    request,
)
from fedloom.tasks.base import ChecksData, DescribesModel, SiteContext, metrics_of
from fedloom.tasks.dp_sgd import check_task_supports
from fedloom.workspace import WorkspaceCode


@dataclass(frozen=True)
class Placement:
    """Where a worker's simulated sites run and keep their state: the device (None:
    the plan's ``training.device``), the share of that GPU's memory the worker may take
    (``--gpus`` with more workers than GPUs), and the folder holding one state folder
    per site."""

    device: str | None = None
    memory_fraction: float | None = None
    state_root: str | None = None


class SiteWorker:
    """Answers requests: ``init``, ``check`` (one site's data against the task),
    ``run`` (one site, one instruction), ``test``, ``baseline``."""

    def __init__(
        self,
        workspace: str,
        plan_json: str,
        attack_json: str,
        expected_hash: str | None = None,
        placement: Placement | None = None,
    ) -> None:
        plan = validate_plan(json.loads(plan_json))
        placement = placement or Placement()
        self.plan = plan
        self.code = WorkspaceCode.read(workspace)
        self.plan_hash = plan_hash(plan, self.code)  # of the very code loaded below
        if expected_hash is not None and self.plan_hash != expected_hash:
            raise WorkspaceError(
                f"the code of {workspace} changed while the simulation ran: the plan hash is "
                f"{expected_hash[:16]}… there and {self.plan_hash[:16]}… in this worker",
                hint="run it again once the workspace's files stay put",
            )
        self.task = plan_task(self.code, plan, self.plan_hash)
        check_task_supports(self.task, plan.privacy.dp_sgd is not None)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        self.device = resolve_device(placement.device or plan.training.device)
        limit_memory(self.device, placement.memory_fraction)
        self.state_root = Path(placement.state_root) if placement.state_root else None
        self.source = DataSource(plan, Path(workspace), self.task)
        self.source.prepare()  # a partition that cannot be made fails here, clearly
        self.attack = attack_from_json(json.loads(attack_json))
        self._cached: tuple[Any, Weights] | None = None
        self._index = {s: i for i, s in enumerate(plan.roster)}

    def handle(self, header: dict[str, Any], weights: Weights | None) -> Reply:
        op = op_of(header)
        if op is WorkerOp.INIT:
            declared = metrics_to_json(metrics_of(self.task))  # for the run's figures
            size = self.task.model_bytes() if isinstance(self.task, DescribesModel) else None
            reply = {
                "ok": True,
                "plan_hash": self.plan_hash,
                "metrics": declared,
                "model_bytes": size,
            }
            return reply, self.task.init_weights(self.plan.seed)
        if weights is None and self._cached is not None and self._cached[0] == header["key"]:
            weights = self._cached[1]
        if weights is None:
            raise TaskError("worker has no weights for this request")
        self._cached = (header.get("key"), weights)
        weights = read_only(weights)  # the task never writes into what it was given
        if op is WorkerOp.RUN:
            return self._run(header, weights)
        if op is WorkerOp.CHECK:
            return self._check(str(header["site"]), weights)
        if op is WorkerOp.TEST:
            test = self.source.test_set()
            return _metrics_reply(self.task.evaluate(weights, test, self._context("test")))
        if op is WorkerOp.BASELINE:
            return self._baseline(weights)
        raise TaskError(f"a worker is not asked to {op.value} this way")

    def _run(self, header: dict[str, Any], weights: Weights) -> Reply:
        """Run each site of the batch in turn from the same model; one site's failure is
        its own answer, the others go on. The reply's tensors are each site's delta,
        named ``"<position in the batch>/<tensor>"``."""
        answers: list[dict[str, Any]] = []
        deltas: Weights = {}
        for i, (site, sent) in enumerate(zip(header["sites"], header["instructions"], strict=True)):
            try:
                instruction = instruction_from_json(sent)
                answer = self._run_site(site, instruction, weights)
            except Exception as err:
                answers.append(error_reply(err))
                continue
            answers.append(
                {
                    "ok": True,
                    "num_samples": answer.num_samples,
                    "metrics": dict(answer.metrics),
                    "local_steps": answer.local_steps,
                }
            )
            if answer.delta is not None:
                deltas.update({f"{i}/{name}": array for name, array in answer.delta.items()})
        return {"ok": True, "answers": answers}, deltas

    def _check(self, site: str, weights: Weights) -> Reply:
        """The task's smoke check (:class:`ChecksData`) on ``site``'s data, before round
        1: a task whose data does not fit it is refused before anything is trained."""
        if isinstance(self.task, ChecksData):
            context = dataclasses.replace(
                self._context(site),
                index=self._index[site],
                data_path=self.source.data_path(site),
                dp_sgd=dp_sgd_of(self.plan, site, 1)[0],
            )
            try:
                self.task.check_data(weights, self.source.site_data(site), context)
            finally:
                release_memory(self.device)
        return {"ok": True}, None

    def _context(self, name: str) -> SiteContext:
        """The context of work outside a site's rounds: the test set, the baseline."""
        return outside_rounds(self.plan, name, self.device)

    def _run_site(self, site: str, instruction: Instruction, weights: Weights) -> SiteAnswer:
        dp_sgd, rounds_selected = dp_sgd_of(self.plan, site, instruction.round)
        state_dir = None
        if self.state_root is not None:  # the site's own folder, there for its task
            state_dir = self.state_root / site
            state_dir.mkdir(parents=True, exist_ok=True)
        env = site_env(
            self.plan,
            device=self.device,
            data_path=self.source.data_path(site),
            state_dir=state_dir,
        )
        try:
            return self._execute(site, instruction, weights, dp_sgd, rounds_selected, env)
        finally:
            release_memory(self.device)

    def _execute(
        self,
        site: str,
        instruction: Instruction,
        weights: Weights,
        dp_sgd: DPSGDSettings | None,
        rounds_selected: int,
        env: SiteEnv,
    ) -> SiteAnswer:
        attacked = None
        if self.attack is not None and site in self.attack.attackers:
            num_classes, seed = self.source.num_classes, self.plan.seed
            attacked = AttackedTask(self.task, self.attack, num_classes=num_classes, plan_seed=seed)
        answer = execute(
            attacked or self.task,
            instruction,
            weights,
            self.source.site_data(site),
            site=site,
            index=self._index[site],
            plan_seed=self.plan.seed,
            dp_sgd=dp_sgd,
            rounds_selected=rounds_selected,
            env=env,
        )
        return answer if attacked is None else attacked.sent(answer, site, instruction.round)

    def _baseline(self, weights: Weights) -> Reply:
        """Train the same model centrally on every site's training data, as long as
        the federation trained (rounds x epochs), and evaluate it on the test set."""
        pooled = self.source.pooled_train()
        per_round = self.plan.train_settings()
        settings = dataclasses.replace(per_round, epochs=per_round.epochs * self.plan.rounds)
        context = dataclasses.replace(self._context("centralised"), seed=1, total_rounds=1)
        out = self.task.train(weights, pooled, settings, context)
        test = self.source.test_set()
        return _metrics_reply(self.task.evaluate(out.weights, test, self._context("test")))


def _metrics_reply(out: EvalOutput) -> Reply:
    """The test set's figures as JSON: a task's NumPy scalars become plain floats."""
    metrics = {k: float(v) for k, v in out.metrics.items()}
    return {"ok": True, "num_samples": int(out.num_samples), "metrics": metrics}, None


def serve(conn: Connection) -> None:
    """Serve requests on ``conn`` until told to stop (the worker process's main)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        setup = json.loads(conn.recv_bytes())
        worker = SiteWorker(
            setup["workspace"],
            setup["plan"],
            setup["attack"],
            setup.get("plan_hash"),
            Placement(**setup.get("placement", {})),
        )
    except Exception as err:  # report, so the parent can say why
        with contextlib.suppress(OSError):
            pipes.send(conn, error_reply(err))
        return
    try:
        pipes.send(conn, {"ok": True})
    except OSError:
        return  # the parent is gone already
    while True:
        try:
            header, weights = pipes.receive(conn)
        except (EOFError, OSError):
            return
        if header.get("op") == WorkerOp.STOP.value:
            return
        try:
            reply, out = worker.handle(header, weights)
        except Exception as err:
            reply, out = error_reply(err), None
        try:
            pipes.send(conn, reply, out)
        except OSError:
            return  # the parent is gone


class ProcessWorker:
    """A :class:`SiteWorker` in a fresh Python process (``python -m
    fedloom.simulation.workerproc``), linked by a socket pair: nothing is inherited, nothing
    pickled, and the caller's ``__main__`` is never re-imported.

    A request that gets no answer within ``call_timeout`` seconds (a hung task) fails
    with :class:`WorkerDied`, and the process is replaced by a fresh one.
    """

    def __init__(
        self,
        workspace: str,
        plan_json: str,
        attack_json: str,
        *,
        call_timeout: float | None = None,
        plan_hash: str | None = None,
        placement: Placement | None = None,
        visible_gpu: int | None = None,
    ) -> None:
        # every start (a restart too) checks it loads the code of ``plan_hash``
        setup = {"workspace": workspace, "plan": plan_json, "attack": attack_json}
        where = dataclasses.asdict(placement or Placement())
        self._setup = json.dumps(setup | {"plan_hash": plan_hash, "placement": where})
        self._visible_gpu = visible_gpu
        self._lock = threading.Lock()
        self._closing = False
        self.call_timeout = call_timeout
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if self._visible_gpu is not None:  # --gpus: this worker sees one GPU, as cuda:0
            env["CUDA_VISIBLE_DEVICES"] = str(self._visible_gpu)
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedloom.simulation.workerproc",
                str(theirs.fileno()),
                str(os.getpid()),
            ],
            pass_fds=(theirs.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C is the parent's alone to handle
        )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send_bytes(self._setup.encode())
        self._ready: bool | None = None

    def _restart(self) -> int | None:
        self._proc.kill()
        code = self._proc.wait()
        self._conn.close()
        if not self._closing:
            self._start()
        return code

    def wait_ready(self) -> None:
        if self._ready:
            return
        try:
            header, _ = pipes.receive(self._conn)
        except (EOFError, OSError) as err:
            raise WorkerDied("a worker process died while starting") from err
        raise_reply_error(header, "a worker could not start")
        self._ready = True

    def call(self, header: dict[str, Any], weights: Weights | None = None) -> Reply:
        with self._lock:
            if self._closing:
                raise WorkerDied("the simulation is shutting down")
            self.wait_ready()
            timeout = request_timeout(self.call_timeout, header)
            try:
                pipes.send(self._conn, header, weights)
                if timeout is not None and not self._conn.poll(timeout):
                    self._restart()
                    raise WorkerDied(no_answer(timeout, header, "its worker process"))
                return pipes.receive(self._conn)
            except (EOFError, OSError) as err:
                if self._closing:
                    raise WorkerDied("the simulation is shutting down") from err
                code = self._restart()
                raise WorkerDied(f"worker process died (exit code {code})") from err

    def abort(self) -> None:
        """Stop now, even in the middle of a request (which then fails)."""
        self._closing = True
        self._proc.kill()

    def close(self) -> None:
        self._closing = True
        try:
            pipes.send(self._conn, request(WorkerOp.STOP))
        except OSError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()


class LocalWorker:
    """A :class:`SiteWorker` in this process (``--workers 0``: debugging, tests)."""

    def __init__(
        self,
        workspace: str,
        plan_json: str,
        attack_json: str,
        plan_hash: str | None = None,
        placement: Placement | None = None,
    ) -> None:
        self._worker = SiteWorker(workspace, plan_json, attack_json, plan_hash, placement)
        self._lock = threading.Lock()

    def wait_ready(self) -> None:
        return None

    def abort(self) -> None:
        return None  # nothing to interrupt: a request runs in the caller's own thread

    def call(self, header: dict[str, Any], weights: Weights | None = None) -> Reply:
        if weights is not None:  # a private copy, as a worker process gets: the in-process
            weights = copy_weights(weights)  # download is a view of the global model
        with self._lock:
            try:
                return self._worker.handle(header, weights)
            except Exception as err:
                return error_reply(err), None

    def close(self) -> None:
        return None


class Worker(Protocol):
    """Where sites do their local work: :class:`ProcessWorker`, :class:`LocalWorker`, or
    ``RayWorker`` (``fedloom.simulation.ray_backend``). One request at a time; a worker that
    dies, or gives no answer within its timeout, fails that request with
    :class:`WorkerDied` and is replaced."""

    def wait_ready(self) -> None: ...
    def call(self, header: dict[str, Any], weights: Weights | None = None) -> Reply: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
