"""mypy over src/, as one test of the suite: it runs on one pytest worker while the others
run the rest of it (`make typecheck` runs it alone)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from workspaces import REPO

pytestmark = pytest.mark.process


def test_mypy_finds_no_problem_in_src() -> None:
    done = subprocess.run(  # noqa: S603 - mypy on our own source
        [sys.executable, "-m", "mypy", "src"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout
