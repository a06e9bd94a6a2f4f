"""The tier guard (tests/tiers.py) fails a test that starts a process or a server without a
marker, and lets a marked one pass: checked on a synthetic test file in a pytest of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

TESTS = Path(__file__).parent

SYNTHETIC = """
import socket
import subprocess
import sys

import pytest

def test_unmarked_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_unmarked_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()


@pytest.mark.process
def test_marked_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.server
def test_marked_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()


def test_a_unit():
    assert sum([1, 2]) == 3
"""


def test_an_unmarked_process_or_server_fails_and_a_marked_one_passes(tmp_path: Path) -> None:
    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC)
    (tmp_path / "conftest.py").write_text(
        "from tiers import _watch_processes_and_servers, pytest_runtest_protocol, "
        "pytest_runtest_teardown\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    process: p\n    server: s\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-q",
            "-p",
            "no:randomly",
            str(tmp_path),
            "--rootdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "5 passed, 2 errors" in out, out  # the marked ones and the unit pass
    assert "test_unmarked_starts_a_process starts a process but carries neither marker" in out
    assert "test_unmarked_listens starts a server but carries neither marker" in out
    assert "test_marked" not in out.split("short test summary info")[-1]
