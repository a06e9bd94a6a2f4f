"""``fedloom simulate --backend ray``: the sites' local work on a real Ray cluster.

The cluster is a Ray head started as its own process (``ray start --head --block``),
on free ports and its own temporary folder, and stopped after the module's tests; the
simulations are real ``fedloom`` processes that connect to it.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import psutil
import pytest
from test_no_pickle import _guarded_env
from workspaces import FEDLOOM, REPO, make_workspace, run_cli, write_training_twist

from fedloom.simulation import pipes

pytestmark = pytest.mark.process

RAY = Path(sys.executable).parent / "ray"
HEAD_START = 120.0  # seconds for `ray start --head` to say it has started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes of the head rooted at ``temp_dir`` (its path is in their command line)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


@dataclass(frozen=True)
class RayHead:
    address: str  # 127.0.0.1:PORT
    env: dict[str, str]  # what a process needs to be let in: the cluster's token


def _require_ray() -> None:
    """Ray is in the dev extra that `make test` installs: its absence is a broken set-up,
    not a reason to pass."""
    assert RAY.is_file(), "Ray is not installed: pip install -e '.[torch,dev]' (or 'fedloom[ray]')"


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A Ray head with 2 CPUs, running as its own process for this module's tests, with
    token authentication (its own token, not the user's ~/.ray/auth_token)."""
    _require_ray()
    temp_dir = tempfile.mkdtemp(prefix="fl-ray-")  # short: Ray's socket paths live under it
    token = Path(temp_dir) / "token"
    token.write_text(secrets.token_hex(16))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = _free_port()
    command = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus", "2", "--object-store-memory", str(200 * 1024 * 1024),
        "--include-dashboard=false", "--temp-dir", temp_dir,
        "--port", str(port), "--ray-client-server-port", str(_free_port()),
        "--dashboard-port", str(_free_port()),
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **auth}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    head = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: nothing else gets our signals
    )
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    output: list[str] = []

    def drain() -> None:  # keeps reading, so the head never blocks on a full pipe
        assert head.stdout is not None
        for line in head.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + HEAD_START
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the Ray head did not start in {HEAD_START:g} s:\n{''.join(output)}")
            if line is None:
                pytest.fail(f"the Ray head exited ({head.wait()}):\n{''.join(output)}")
            if "Ray runtime started" in line:
                break
        yield RayHead(f"127.0.0.1:{port}", auth)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        left = _ray_processes(temp_dir)
        for proc in left:
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert left == [], f"the Ray head left processes behind: {left}"


def _summary(ws: Path, run: str) -> dict[str, object]:
    return dict(json.loads((ws / "runs" / run / "summary.json").read_text()))


@pytest.mark.slow
def test_a_simulation_on_a_ray_cluster_matches_worker_processes(
    tmp_path: Path, ray_head: RayHead
) -> None:
    ws = make_workspace(tmp_path, "digits")
    plan = ("rounds=2", "sites=3", "training.epochs=1")
    guarded = {**_guarded_env(tmp_path), **ray_head.env}  # this process never unpickles
    on_ray = run_cli(
        "simulate", str(ws), "--backend", "ray", "--ray-address", ray_head.address,
        "--quiet", "--run-name", "ray", *plan, timeout=300, env=guarded,
    )  # fmt: skip
    assert on_ray.returncode == 0, on_ray.stderr
    assert "unpickling attempted" not in on_ray.stderr
    assert (tmp_path / "guarded-pids.txt").read_text().split() != []
    assert f"the Ray cluster at {ray_head.address}" in on_ray.stdout
    here = run_cli("simulate", str(ws), "--workers", "2", "--quiet", "--run-name", "here", *plan)
    assert here.returncode == 0, here.stderr
    ray_summary, here_summary = _summary(ws, "ray"), _summary(ws, "here")
    assert ray_summary["failures"] == 0
    assert ray_summary["test_accuracy"] == here_summary["test_accuracy"]
    assert ray_summary["test_accuracy"] > 0.5  # type: ignore[operator]
    # The same code runs the same requests: the models are bit-identical.
    final = "final.safetensors"
    assert (ws / "runs/ray" / final).read_bytes() == (ws / "runs/here" / final).read_bytes()


@pytest.mark.slow
def test_a_ray_worker_that_dies_or_hangs_fails_its_site_and_is_replaced(
    tmp_path: Path, ray_head: RayHead
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    write_training_twist(
        ws,
        "import os, time\n"
        "        if context.round == 1 and context.site == 'site-01': os._exit(3)\n"
        "        if context.round == 1 and context.site == 'site-02': time.sleep(300)",
    )
    started = time.monotonic()
    proc = run_cli(
        "simulate", str(ws), "--backend", "ray", "--ray-address", ray_head.address, "--quiet",
        "--workers", "2", "--run-name", "r", "rounds=2", "deadline.round_seconds=20",
        "deadline.min_fraction=0.5", timeout=300, env=ray_head.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 200  # the hung task did not hold the run
    failed = {
        (m["round"], m["site"]): m.get("reason", "")
        for m in map(json.loads, (ws / "runs/r/metrics.jsonl").read_text().splitlines())
        if m["status"] != "ok"
    }
    assert "its Ray worker died" in failed[(1, "site-01")]
    # Its call timed out and its actor was replaced; the round may have closed first.
    assert any(
        reason in failed[(1, "site-02")]
        for reason in ("gave no answer within 20 s", "no answer before the round's deadline")
    )
    # Round 2 and the final evaluation had every site: the two workers were replaced.
    assert {r for r, _ in failed} == {1}
    assert _summary(ws, "r")["status"] == "completed"


@pytest.mark.slow
def test_a_cluster_with_token_authentication_refuses_a_run_without_its_token(
    tmp_path: Path, ray_head: RayHead
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    proc = run_cli(
        "simulate", str(ws), "--backend", "ray", "--ray-address", ray_head.address,
        "--quiet", "--run-name", "r", timeout=300, env={"RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert proc.returncode == 6, proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"cannot connect to the Ray cluster at {ray_head.address}" in message
    assert "RAY_AUTH_MODE=token" in message and "Traceback" not in message


def test_an_unreachable_cluster_is_refused_in_seconds(tmp_path: Path) -> None:
    _require_ray()
    ws = make_workspace(tmp_path, "breast-cancer")
    started = time.monotonic()
    proc = run_cli(
        "simulate", str(ws), "--backend", "ray", "--ray-address", f"127.0.0.1:{_free_port()}",
        "--quiet", "--run-name", "r", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 6, proc.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:" in proc.stderr
    assert "ray start --head" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60  # Ray alone would retry for minutes
    assert _summary(ws, "r")["status"] == "failed"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--ray-address", "10.0.0.5:6379"), "--ray-address: only with --backend ray"),
        (("--backend", "ray", "--workers", "0"), "--workers 0: with --backend ray"),
        (("--backend", "ray", "--ray-address", "headnode"), "must be HOST:PORT"),
        (("--backend", "ray", "--transport", "grpc"), "--backend ray: only with --transport"),
    ],
    ids=["address-without-ray", "workers-0", "address-without-port", "grpc"],
)
def test_ray_options_that_cannot_run_are_refused_before_anything_runs(
    tmp_path: Path, args: tuple[str, ...], problem: str
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    proc = run_cli("simulate", str(ws), *args)
    assert proc.returncode == 2, proc.stderr
    assert problem in " ".join(proc.stderr.split())
    assert not (ws / "runs").exists()


def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what `import ray` meets without Ray
        "from fedloom.cli.main import main\n"
        f"sys.argv = ['fedloom', 'simulate', {str(ws)!r}, '--backend', 'ray']\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'fedloom[ray]'" in " ".join(proc.stderr.split())
    assert not (ws / "runs").exists()


def test_only_the_ray_backend_imports_ray() -> None:
    importers = [
        str(path.relative_to(REPO))
        for path in (REPO / "src" / "fedloom").rglob("*.py")
        if any(
            line.strip().startswith(("import ray", "from ray"))
            for line in path.read_text().splitlines()
        )
    ]
    assert importers == ["src/fedloom/simulation/ray_backend.py"]
    code = (
        "import sys, fedloom, fedloom.cli.main, fedloom.simulation.ray_backend\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    proc = subprocess.run([*FEDLOOM[:1], "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# -------------------------------------------------------- the packed messages


def _weights() -> dict[str, np.ndarray]:
    return {
        "half": np.arange(5, dtype=np.float16),  # 10 bytes: the next tensor needs padding
        "bf16": np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16),
        "w": np.linspace(-1, 1, 12).reshape(3, 4),
        "empty": np.zeros((0, 4), np.float32),
        "steps": np.array(7, np.int64),
    }


def test_a_packed_message_unpacks_to_the_same_header_and_arrays() -> None:
    weights = _weights()
    header, out = pipes.unpack(pipes.pack({"op": "run", "key": "train:1"}, weights))
    assert header == {"op": "run", "key": "train:1"}
    assert out is not None and list(out) == list(weights)
    for name, array in weights.items():
        assert out[name].dtype == array.dtype and out[name].shape == array.shape
        assert out[name].tobytes() == array.tobytes()
        assert out[name].flags.aligned and not out[name].flags.writeable
    assert pipes.unpack(pipes.pack({"ok": True})) == ({"ok": True}, None)
    assert pipes.unpack(pipes.pack({"ok": True}, {})) == ({"ok": True}, {})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda b: b[:-1], "cut short in tensor 'steps'"),
        (lambda b: b[:20], "cut short"),
        (lambda b: b + b"\0", "bytes past its last tensor"),
    ],
    ids=["last-tensor-cut", "header-cut", "extra-bytes"],
)
def test_a_damaged_packed_message_is_refused(change: object, problem: str) -> None:
    data = pipes.pack({"op": "run"}, _weights())
    with pytest.raises(ValueError, match=problem):
        pipes.unpack(change(data))  # type: ignore[operator]
