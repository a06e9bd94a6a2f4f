"""A site's data is checked when its collaborator starts, before it connects: a file
that cannot be read, or arrays the site could not train on, are refused with every
problem named and exit code 3, and nothing is sent. Real processes, real files."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from chaos import free_port
from workspaces import make_workspace

from fedloom.deployment import launcher
from fedloom.runtime.sitedata import data_problems
from fedloom.tasks.base import SiteData

pytestmark = pytest.mark.process

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
ROWS, FEATURES = 40, 30  # breast-cancer: 30 features, 2 classes


def good() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    return {"x": x, "y": (np.arange(ROWS) % 2).astype(np.int64)}


def with_nan() -> dict[str, np.ndarray]:
    arrays = good()
    arrays["x"][7, 3] = np.nan
    return arrays


def replaced(**changes: np.ndarray) -> Callable[[], dict[str, np.ndarray]]:
    return lambda: {**good(), **changes}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # savez would add .npz to another suffix
        np.savez(fh, **arrays)


def save_npy_as_npz(path: Path) -> None:
    with open(path, "wb") as fh:
        np.save(fh, good()["x"])


BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty": (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
    "npy-renamed": (save_npy_as_npz, "it is a single .npy array, not an .npz archive"),
    "text": (lambda p: p.write_text("a,b\n1,2\n"), "it is not an .npz archive"),
    "lengths": (
        lambda p: save_npz(p, {**good(), "y": np.zeros(ROWS - 1, np.int64)}),
        "x and y must have one row per sample each (x has shape (40, 30), y (39,))",
    ),
    "zero-rows": (
        lambda p: save_npz(
            p, {"x": np.zeros((0, FEATURES), np.float32), "y": np.zeros(0, np.int64)}
        ),
        "x and y have 0 rows: there is nothing to train on",
    ),
    "nan": (lambda p: save_npz(p, with_nan()), "NaN or infinite value(s), first in row"),
    "label-range": (
        lambda p: save_npz(p, replaced(y=np.full(ROWS, 5, np.int64))()),
        "label(s) outside 0..1 (found 5..5): the model has 2 classes",
    ),
    "float-labels": (
        lambda p: save_npz(p, replaced(y=np.arange(ROWS, dtype=np.float64) % 2)()),
        "holds float64 values: labels must be integer class indices 0..1",
    ),
    "string-labels": (
        lambda p: save_npz(p, replaced(y=np.array(["benign", "malignant"] * (ROWS // 2)))()),
        "values: labels must be integer class indices",
    ),
    "features": (
        lambda p: save_npz(p, replaced(x=np.zeros((ROWS, FEATURES - 1), np.float32))()),
        "the model does not fit it: running the initial model",
    ),
    "missing-arrays": (
        lambda p: save_npz(p, {"a": np.zeros(3)}),
        "it holds ['a']; expected x and y",
    ),
}


@pytest.fixture(scope="module")
def site_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedloom.pki import provision

    ws = make_workspace(tmp_path_factory.mktemp("sitedata"), "breast-cancer")
    provision(ws, ["site-01", "site-02"])
    return ws


def start(ws: Path, data: Path, port: int) -> subprocess.CompletedProcess[str]:
    """``fedloom collaborator start --data DATA`` with no aggregator listening on
    ``port``: a site that got as far as connecting gives up after a second (exit 6)."""
    return subprocess.run(  # noqa: S603 - our own command
        launcher.fedloom_command(
            "collaborator",
            "start",
            str(ws),
            "sites=2",
            "--name",
            "site-01",
            "--aggregator",
            f"127.0.0.1:{port}",
            "--data",
            str(data),
            "--give-up-after",
            "1",
        ),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_site_data_is_refused_before_the_site_connects(
    site_workspace: Path, tmp_path: Path, case: str
) -> None:
    make, said = BAD_FILES[case]
    data = tmp_path / f"{case}.npz"
    make(data)
    done = start(site_workspace, data, free_port())
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 3, out
    assert f"error: the site's data {data}" in out, out
    assert said in out, out
    assert " hint: " in out, out
    assert "Traceback" not in out, out
    log = (site_workspace / "sites" / "site-01" / "collaborator.log").read_text()
    assert "joined federation" not in log


def test_good_site_data_passes_the_checks_and_the_site_goes_on_to_connect(
    site_workspace: Path, tmp_path: Path
) -> None:
    data = tmp_path / "good.npz"
    save_npz(data, good())
    done = start(site_workspace, data, free_port())
    out = done.stdout + done.stderr
    assert done.returncode == 6, out  # nobody listens: it gave up reaching the aggregator
    assert "the site's data" not in out, out


def test_every_problem_of_the_data_is_named_at_once() -> None:
    x = np.ones((4, 3), np.float32)
    x[1, 1] = np.inf
    data = SiteData(x, np.array([0, 1, 2], np.int64), np.ones((2, 2), np.float32), np.zeros(2))
    assert data_problems(data, num_classes=2) == [
        "x_train has 4 rows but y_train has 3: one label per sample",
        "x_train has 1 NaN or infinite value(s), first in row 1: fill or drop them before training",
        "y_train has 1 label(s) outside 0..1 (found 0..2): the model has 2 classes",
        "y_val holds float64 values: labels must be integer class indices 0..1 (convert "
        "them, e.g. y.astype(np.int64), if they are whole)",
        "x_train's rows have shape (3,) but x_val's have (2,)",
    ]
    # a custom task that declares no classes may have any numeric labels (a regression)
    regression = SiteData(np.ones((3, 2)), np.array([0.5, 1.5, 2.0]), np.ones((1, 2)), np.ones(1))
    assert data_problems(regression, num_classes=None) == []
