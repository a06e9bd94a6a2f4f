"""Shared fixtures: a tiny model, a deterministic site runner, and a harness that runs a
real :class:`~fedloom.aggregator.Aggregator` in a thread.

Time in the harness is a :class:`~fedloom.core.clock.ManualClock`: deadlines pass only when a
test advances it, so nothing sleeps. Every wait on another thread has a real timeout
(:data:`WAIT`), and the harness's teardown advances the clock until the round loop has
ended, so a failing test never hangs the session.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiers import (  # noqa: F401 - the tier guard's fixture and hooks, for every test
    _watch_processes_and_servers,
    pytest_runtest_protocol,
    pytest_runtest_teardown,
)

from fedloom.aggregator import Aggregator, FederationConfig, StepHandler
from fedloom.collaborator import Collaborator, SiteStep
from fedloom.core.clock import FaultPoints, ManualClock
from fedloom.core.events import Event, Journal, Resume, RoundClosed, RoundOpened, SiteAnswered
from fedloom.core.records import Instruction, InstructionKind, SiteAnswer
from fedloom.core.weights import Weights
from fedloom.privacy.aggregator import AggregatorPrivacy
from fedloom.privacy.site import SitePrivacy
from fedloom.strategies import FedAvg, Strategy
from fedloom.transport import InProcessTransport

# The CLI's tables fit the console's width (80 columns when it is not a terminal); test
# paths are long (more so under pytest-xdist), so the suite's consoles are wider. A
# subprocess inherits it.
os.environ.setdefault("COLUMNS", "200")

# A suite started from a background job (`nohup make test &`, a CI step run with `&`)
# inherits SIGINT ignored, and so would every process a test starts: the Ctrl-C tests
# (tests/test_aggregator_stops.py, test_deploy.py, test_debugging.py) need it delivered.
# A handled signal is reset to its default in a child at exec, so handling it here is
# enough; an interactive run already has this handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

WAIT = 10.0
"""Real seconds a test waits for another thread before it fails."""


def make_tiny_weights() -> Weights:
    return {
        "w": (np.arange(12, dtype=np.float32).reshape(3, 4) / 4 - 1).astype(np.float32),
        "b": np.array([0.5, -0.25, 0.0, 1.0], dtype=np.float32),
        "steps": np.array(0, dtype=np.int64),
    }


@pytest.fixture
def tiny_weights() -> Weights:
    """A fresh copy of the tiny model: float32 (3, 4) and (4,), and an int64 0-d counter."""
    return make_tiny_weights()


def wait_until(predicate: Callable[[], bool], what: str = "a condition") -> None:
    """Poll ``predicate`` (every 10 ms) until it holds; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        threading.Event().wait(0.01)


class ShiftRunner:
    """A site's runner: a plain function of (site index, round), no data, no training.

    The delta is ``(index + 1) * round / 64`` times a fixed dyadic pattern (exact in
    float32), and ``+1`` on the ``steps`` counter. Evaluation answers carry no tensors.
    """

    def __init__(self, index: int, samples: int) -> None:
        self.index = index
        self.samples = samples
        self.calls: list[Instruction] = []

    @staticmethod
    def delta(index: int, round: int) -> Weights:
        scale = (index + 1) * round / 64
        return {
            "w": (np.arange(12, dtype=np.float64).reshape(3, 4) / 8 - 0.75) * scale,
            "b": np.array([1.0, -1.0, 0.5, 2.0]) * scale,
            "steps": np.array(1, dtype=np.int64),
        }

    @classmethod
    def delta_like(cls, weights: Weights, index: int, round: int) -> Weights:
        """:meth:`delta` shaped and typed like ``weights``: what the site uploads."""
        return {
            name: np.broadcast_to(d, weights[name].shape).astype(weights[name].dtype)
            for name, d in cls.delta(index, round).items()
        }

    def __call__(self, instruction: Instruction, weights: Weights) -> SiteAnswer:
        self.calls.append(instruction)
        if instruction.kind is InstructionKind.EVALUATE:
            return SiteAnswer(self.samples, {"loss": float(self.index)}, None)
        delta = self.delta_like(weights, self.index, instruction.round)
        return SiteAnswer(self.samples, {"loss": 1.0 + self.index}, delta)


@pytest.fixture
def shift_runner() -> type[ShiftRunner]:
    return ShiftRunner


class EventLog:
    """An ``on_event`` sink that keeps every event and lets a test wait for a condition."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def snapshot(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def wait_until(self, predicate: Callable[[list[Event]], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.events), timeout=WAIT):
                pytest.fail(f"timed out waiting for {what}; events so far: {self.events}")

    def wait_opened(self, round: int, attempt: int = 1) -> RoundOpened:
        self.wait_until(
            lambda evs: (
                len([e for e in evs if isinstance(e, RoundOpened) and e.round == round]) >= attempt
            ),
            f"round {round} (attempt {attempt}) to open",
        )
        return [e for e in self.snapshot() if isinstance(e, RoundOpened) and e.round == round][
            attempt - 1
        ]

    def answered(self, round: int) -> list[SiteAnswered]:
        return [e for e in self.snapshot() if isinstance(e, SiteAnswered) and e.round == round]

    def wait_answered(self, round: int, count: int) -> None:
        self.wait_until(
            lambda evs: (
                len([e for e in evs if isinstance(e, SiteAnswered) and e.round == round]) >= count
            ),
            f"{count} answers in round {round}",
        )

    def closed(self) -> list[RoundClosed]:
        return [e for e in self.snapshot() if isinstance(e, RoundClosed)]


class Worker:
    """A daemon thread that keeps what its function returned or raised."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        self.name = name
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as err:  # kept for the test to re-raise
            self.error = err

    def join(self, timeout: float = WAIT) -> Any:
        """Wait for the thread; fail if it is still running; re-raise what it raised."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"{self.name} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


TransportFactory = Callable[[Aggregator], Any]


def inprocess(service: Aggregator) -> InProcessTransport:
    return InProcessTransport(service)


class Federation:
    """A real Aggregator on a ManualClock, its transport, and collaborator threads."""

    def __init__(
        self,
        config: FederationConfig,
        weights: Weights,
        *,
        strategy: Strategy,
        transport: TransportFactory,
        exchange_steps: Mapping[str, StepHandler] | None = None,
        journal: Journal | None = None,
        resume: Resume | None = None,
        privacy: AggregatorPrivacy | None = None,
    ) -> None:
        self.config = config
        self.clock = ManualClock()
        self.faults = FaultPoints()
        self.log = EventLog()
        self.aggregator = Aggregator(
            config,
            strategy,
            weights,
            clock=self.clock,
            faults=self.faults,
            on_event=self.log,
            exchange_steps=exchange_steps,
            journal=journal,
            resume=resume,
            privacy=privacy,
        )
        self.transport = transport(self.aggregator)
        self.loop: Worker | None = None
        self.sites: dict[str, Worker] = {}
        self.extra: list[Worker] = []

    def start(self) -> None:
        self.loop = Worker("aggregator run()", self.aggregator.run)

    def spawn(self, name: str, fn: Callable[[], Any]) -> Worker:
        """Run ``fn`` in a thread of its own (an upload a test wants to hold mid-way)."""
        worker = Worker(name, fn)
        self.extra.append(worker)
        return worker

    def connect(self, site: str) -> Any:
        return self.transport.connect(site)

    def start_site(
        self,
        site: str,
        runner: Callable[[Instruction, Weights], SiteAnswer],
        exchange_steps: Mapping[str, SiteStep] | None = None,
        *,
        privacy: SitePrivacy | None = None,
        faults: FaultPoints | None = None,
    ) -> None:
        collaborator = Collaborator(
            self.connect(site), runner, exchange_steps, privacy=privacy, faults=faults
        )
        self.sites[site] = Worker(f"collaborator {site!r}", collaborator.run)

    def finish(self) -> Any:
        """Join the round loop, then every collaborator; return the history."""
        assert self.loop is not None
        deadline = time.monotonic() + WAIT
        while self.loop.thread.is_alive() and time.monotonic() < deadline:
            for worker in self.sites.values():
                if worker.error is not None:  # a crashed site would stall the round
                    raise worker.error
            self.loop.thread.join(0.01)
        history = self.loop.join(max(0.0, deadline - time.monotonic()))
        for worker in self.sites.values():
            worker.join()
        return history

    def pass_deadline(self) -> None:
        self.clock.advance(self.config.round_deadline + 1)

    def close(self) -> None:
        """Teardown: advance time until the loop has ended, then check every thread ended."""
        if self.loop is not None:
            for _ in range(500):
                if not self.loop.thread.is_alive():
                    break
                self.clock.advance(1e9)
                self.loop.thread.join(0.01)
        stuck = []
        for worker in [self.loop, *self.sites.values(), *self.extra]:
            if worker is not None:
                worker.thread.join(2.0)
                if worker.thread.is_alive():
                    stuck.append(worker.name)
        if stuck:
            pytest.fail(f"threads still running at teardown: {stuck}")


def attempt_id(round: int, attempt: int = 1) -> str:
    """The attempt id the aggregator gives round ``round``'s ``attempt`` in these tests."""
    return f"run/{round}.{attempt}"


def federation_config(**overrides: Any) -> FederationConfig:
    values: dict[str, Any] = {
        "roster": ("site-a", "site-b", "site-c"),
        "rounds": 2,
        "sites_per_round": 3,
        "min_fraction": 1.0,
        "round_deadline": 60.0,
        "max_retries": 0,
        "seed": 0,
    }
    values.update(overrides)
    return FederationConfig(**values)


@pytest.fixture
def make_federation() -> Iterator[Callable[..., Federation]]:
    """``make_federation(weights, strategy=FedAvg(), transport=..., **config_overrides)``.

    The default config: roster ``site-a``, ``site-b``, ``site-c``, 2 rounds, all sites
    selected, min_fraction 1.0, a 60 s deadline (on the manual clock), no retries.
    """
    made: list[Federation] = []

    def make(
        weights: Weights,
        *,
        strategy: Strategy | None = None,
        transport: TransportFactory = inprocess,
        exchange_steps: Mapping[str, StepHandler] | None = None,
        journal: Journal | None = None,
        resume: Resume | None = None,
        privacy: AggregatorPrivacy | None = None,
        **overrides: Any,
    ) -> Federation:
        fed = Federation(
            federation_config(**overrides),
            weights,
            strategy=strategy or FedAvg(),
            transport=transport,
            exchange_steps=exchange_steps,
            journal=journal,
            resume=resume,
            privacy=privacy,
        )
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


_TemporaryFile = tempfile.TemporaryFile


class SpoolWatch:
    """Every rollback spool file made while it watches (a spool keeps its pieces in
    memory, then in a ``tempfile.TemporaryFile`` in its folder), recorded with the
    folder it was made in.

    Such a file is unnamed on Linux, invisible in its folder; this sees it on every
    platform without reading /proc.
    """

    def __init__(self) -> None:
        self.files: list[tuple[Any, str]] = []

    def on_disk_in(self, folder: Path) -> int:
        """How many spool files are open in ``folder``."""
        return sum(
            1
            for f, where in self.files
            if not f.closed and Path(where).resolve() == folder.resolve()
        )

    def all_closed(self) -> bool:
        return all(f.closed for f, _ in self.files)


@pytest.fixture
def spool_watch(monkeypatch: pytest.MonkeyPatch) -> SpoolWatch:
    watch = SpoolWatch()

    def recorded(*args: Any, **kwargs: Any) -> Any:
        f = _TemporaryFile(*args, **kwargs)
        watch.files.append((f, kwargs.get("dir") or tempfile.gettempdir()))
        return f

    monkeypatch.setattr(tempfile, "TemporaryFile", recorded)
    return watch


@pytest.fixture
def make_grpc_federation(make_federation: Any, tiny_weights: Weights, tmp_path: Path) -> Any:
    """``make_grpc_federation(**config)``: a federation of three sites over gRPC with
    mutual TLS (certificates from fedloom's own PKI, in ``tmp_path / "ws"``)."""
    from grpcnet import GrpcTestTransport

    made: list[GrpcTestTransport] = []

    def transport(service: Any) -> GrpcTestTransport:
        made.append(GrpcTestTransport(service, workspace=tmp_path / "ws"))
        return made[-1]

    def make(**config: Any) -> Any:
        return make_federation(tiny_weights, transport=transport, **config)

    yield make
    for t in made:
        t.close()
