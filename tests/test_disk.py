"""The environment refuses: a read-only workspace and a full disk are said plainly (the
path, what happened, what to do) with exit code 14, never a traceback, and a run cut
short by a full disk resumes bit-identical once space is freed.

Real processes on a real small file system: a tmpfs mounted for the test (this needs
root, or CAP_SYS_ADMIN; without it the tests are skipped, saying why)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos import free_port
from workspaces import make_workspace

from fedloom.core.weights import weights_equal
from fedloom.deployment import launcher
from fedloom.pki import provision
from fedloom.store import load_weights

pytestmark = pytest.mark.process

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
SITES = ("site-01", "site-02")
PLAN = ("sites=2", "rounds=2", "deadline.round_seconds=300", "deadline.min_fraction=1.0")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of its own, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        # make test runs as root (CI does): a mount that fails is a broken set-up
        pytest.fail(f"cannot mount a tmpfs (these tests need root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):  # big writes, then the last bytes
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own command
        launcher.fedloom_command(*args), env=ENV, capture_output=True, text=True, timeout=300
    )


def said(done: subprocess.CompletedProcess[str]) -> str:
    return " ".join((done.stdout + done.stderr).split())


def test_a_read_only_workspace_is_said_with_its_path_and_exit_code_14(small_disk: Path) -> None:
    ws = make_workspace(small_disk, "breast-cancer")
    provision(ws, list(SITES))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    port = str(free_port())
    runs = {
        "simulate": cli("simulate", str(ws), *PLAN, "--quiet"),
        "aggregator": cli("aggregator", "start", str(ws), *PLAN, "--port", port, "--quiet"),
        "collaborator": cli(
            "collaborator",
            "start",
            str(ws),
            *PLAN,
            "--name",
            "site-01",
            "--aggregator",
            f"127.0.0.1:{port}",
            "--give-up-after",
            "1",
        ),  # fmt: skip
    }
    for command, done in runs.items():
        out = said(done)
        assert done.returncode == 14, f"{command}: {out}"
        assert f"error: cannot write {ws}" in out, f"{command}: {out}"
        assert "it is on a read-only file system" in out, f"{command}: {out}"
        assert "hint: remount it read-write" in out, f"{command}: {out}"
        assert "Traceback" not in out, f"{command}: {out}"


def test_a_full_disk_stops_the_aggregator_cleanly_and_the_run_resumes_bit_identical(
    tmp_path: Path, small_disk: Path
) -> None:
    """The sites keep their state on another disk; the aggregator's workspace (a copy:
    the same plan hash) is on the small one, which fills while round 1 is open: round 1
    cannot be recorded, the aggregator stops (exit 14), and started again once the
    space is freed it reruns round 1 and ends bit-identical to an uninterrupted run."""
    ws = make_workspace(tmp_path, "breast-cancer")
    states = provision(ws, list(SITES))
    reference = cli("simulate", str(ws), *PLAN, "--run-name", "ref", "--quiet")
    assert reference.returncode == 0, said(reference)
    agg_ws = small_disk / "fed"
    shutil.copytree(ws, agg_ws, ignore=shutil.ignore_patterns("sites", "runs"))
    port = free_port()

    def aggregator() -> subprocess.Popen[bytes]:
        proc, bound = launcher.start_aggregator(
            agg_ws,
            PLAN,
            "--run-name",
            "run",
            "--quiet",
            port=port,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert bound == port, proc.communicate(timeout=30)[0].decode()
        return proc

    def site(name: str) -> subprocess.Popen[bytes]:
        return launcher.start_collaborator(
            ws, PLAN, name, port, "--state", str(states[name]), "--give-up-after", "300",
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    first = aggregator()  # round 1 is open; with min_fraction 1 it waits for both sites
    sites = [site("site-01")]
    try:
        filler = fill(small_disk)
        sites.append(site("site-02"))  # round 1 closes; its checkpoint does not fit
        out = " ".join(first.communicate(timeout=300)[0].decode().split())
        assert first.returncode == 14, out
        # the checkpoint of round 1, or the state database: whichever was written first
        assert f"error: no space left on the disk of {agg_ws}/aggregator/" in out, out
        assert "hint: free space on that disk" in out, out
        assert "Traceback" not in out, out

        filler.unlink()
        second = aggregator()
        out = second.communicate(timeout=300)[0].decode()
        assert second.returncode == 0, out
        assert "resuming run 'run' from round 1 of 2" in " ".join(out.split()), out
        for proc in sites:
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in sites:
            if proc.poll() is None:
                proc.kill()
    final = load_weights(agg_ws / "runs" / "run" / "final.safetensors")
    assert weights_equal(final, load_weights(ws / "runs" / "ref" / "final.safetensors"))
