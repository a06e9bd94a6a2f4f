"""The test tiers, enforced: a test that starts an OS process or a server (gRPC or a
listening socket) must carry the ``process`` or the ``server`` marker.

``make test-fast`` leaves both out, so a forgotten marker would quietly slow the edit-test
loop or make it flaky. Rather than trust the markers by hand, the suite watches: while a
test (its fixtures included) runs, the ways a test can start a process or a server are
wrapped, and a test that used one without a marker fails at teardown naming what it
started. The wrappers only note the call and then make it unchanged.
"""

from __future__ import annotations

import multiprocessing.process
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

TIER_MARKERS = ("process", "server")
"""Either takes a test out of ``make test-fast``."""

_used: set[str] = set()  # what the test running now started


def _noting(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _used.add(kind)
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


# (owner, attribute, what starting it makes)
_WATCHED: list[tuple[Any, str, str]] = [
    (subprocess.Popen, "__init__", "process"),
    (os, "fork", "process"),
    (os, "posix_spawn", "process"),
    (os, "posix_spawnp", "process"),
    (multiprocessing.process.BaseProcess, "start", "process"),
    (grpc, "server", "server"),
    (socket.socket, "listen", "server"),
]


@pytest.fixture(scope="session", autouse=True)
def _watch_processes_and_servers() -> Iterator[None]:
    present = [(owner, name, kind) for owner, name, kind in _WATCHED if hasattr(owner, name)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in present]
    for owner, name, kind in present:
        setattr(owner, name, _noting(kind, getattr(owner, name)))
    yield
    for owner, name, original in saved:
        setattr(owner, name, original)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    _used.clear()
    yield


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    used = sorted(_used)
    if used and not any(item.get_closest_marker(k) for k in TIER_MARKERS):
        pytest.fail(
            f"{item.nodeid} starts {' and '.join('a ' + k for k in used)} but carries neither "
            f"marker {' nor '.join(TIER_MARKERS)}: add `pytestmark = pytest.mark.{used[0]}` "
            "(or mark the test) so that make test-fast leaves it out",
            pytrace=False,
        )
