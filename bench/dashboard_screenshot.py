"""docs/img/dashboard.png: the dashboard of a live federation, in headless Chromium.

Runs a short federation of real processes (`fedloom simulate --transport grpc`, the
breast-cancer template, DP-FedAvg on, one site failing a round), serves `fedloom
dashboard` beside it, waits for a round half answered, and has the system's Chromium
(`make browser` installs it) save the page as a PNG.

    .venv/bin/python bench/dashboard_screenshot.py [--out docs/img/dashboard.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from fedloom import create_workspace

REPO = Path(__file__).resolve().parents[1]
FEDLOOM = [sys.executable, "-m", "fedloom.cli"]
# each site takes its time, so the picture catches a round with some sites answered;
# site-04 fails round 3, so the page has a failure and its reason to show
TASK = """
import time
from fedloom.tasks import SoftmaxRegression

class Paced(SoftmaxRegression):
    def train(self, weights, data, settings, context):
        time.sleep(1.0 * (context.index + 1))
        if context.site == "site-04" and context.round == 3:
            raise RuntimeError("CUDA out of memory (a simulated failure)")
        return super().train(weights, data, settings, context)

task = Paced(num_features=30, num_classes=2)
"""
PLAN = [
    "rounds=12",
    "deadline.min_fraction=0.5",
    "privacy.dp.noise_multiplier=0.8",
    "privacy.dp.clip=1.0",
    "privacy.dp.epsilon_budget=50",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def state(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "api/state", timeout=5) as r:
            data: dict[str, Any] = json.load(r)
            return data
    except OSError:
        return {"ok": False}


def worth_a_picture(data: dict[str, Any]) -> bool:
    """Round 5 or later under way, one or two sites answered, a failure shown."""
    now = data.get("now") or {}
    return (
        data.get("ok", False)
        and data["rounds"]["finished"] >= 4
        and now.get("round") is not None
        and now.get("progress_published", False)
        and 1 <= len(now["answered"]) <= 2
        and any(s["failures"] for s in data["sites"])
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH: `make browser` installs the system's package")
    with tempfile.TemporaryDirectory() as tmp:
        ws = create_workspace(Path(tmp) / "breast-cancer", "breast-cancer")
        (ws / "task.py").write_text(TASK)
        env = {**os.environ, "NO_COLOR": "1"}
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        run = [*FEDLOOM, "simulate", str(ws), *PLAN, "--transport", "grpc", "--sites", "4"]
        procs = [
            subprocess.Popen([*run, "--run-name", "demo", "--quiet"], env=env, **quiet),  # noqa: S603
            subprocess.Popen(  # noqa: S603
                [*FEDLOOM, "dashboard", str(ws), "--port", str(port)], env=env, **quiet
            ),
        ]
        try:
            deadline = time.monotonic() + 180
            while not worth_a_picture(state(url)):
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    sys.exit("the federation never showed a round half answered")
                time.sleep(0.2)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser = [
                chromium,
                "--headless=new",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1280,1020",
                f"--user-data-dir={tmp}/profile",
                "--virtual-time-budget=2000",  # the page's first poll drawn
                f"--screenshot={args.out.resolve()}",
                url,
            ]
            if os.geteuid() == 0:
                browser.insert(1, "--no-sandbox")
            subprocess.run(browser, check=True, timeout=60, **quiet)  # noqa: S603
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
