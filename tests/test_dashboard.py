"""``fedloom dashboard`` and ``aggregator start --dashboard``: a real federation of OS
processes watched in a real headless Chromium; a token keeps every other viewer out."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, NO_CHROMIUM, Browser
from workspaces import FEDLOOM, make_workspace, run_cli, write_training_twist

from fedloom.dashboard import TOKEN_ENV, Dashboard
from fedloom.deployment.launcher import start_aggregator, start_collaborator
from fedloom.pki import provision

pytestmark = [pytest.mark.process, pytest.mark.server]

SITES = ("site-01", "site-02", "site-03")
# what the page shows: the round counter and every site's row (its data-status)
SEEN = (
    "document.getElementById('round') && JSON.stringify({round: "
    "document.getElementById('round').textContent, sites: "
    "Object.fromEntries([...document.querySelectorAll('tr[data-site]')]"
    ".map(r => [r.dataset.site, r.dataset.status]))})"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_listening(url: str, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(url)
            return
        except OSError:
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {url}")


def stop(*procs: subprocess.Popen[Any]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_page_follows_a_live_federation_and_shows_nothing_without_the_token(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    # sites answer one after another, so the page can catch a round half answered; from
    # round 3 they wait while the gate file exists, so however slow the browser is to
    # start, the federation cannot end before the page has shown a round
    gate = tmp_path / "gate"
    gate.touch()
    write_training_twist(
        ws,
        "(__import__('time').sleep(0.3 * (context.index + 1)), [__import__('time').sleep(0.05) "
        "for _ in iter(lambda: context.round >= 3 and __import__('os').path.exists("
        f"{str(gate)!r}), False)])",
    )
    plan = ["sites=3", "rounds=8"]
    states = provision(ws, list(SITES))
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    # `fedloom dashboard` before the federation: no state yet, said on the page
    open_port = free_port()
    open_url = f"http://127.0.0.1:{open_port}/"
    viewer = subprocess.Popen(  # noqa: S603 - our own command
        [*FEDLOOM, "dashboard", str(ws), "--port", str(open_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs: list[subprocess.Popen[Any]] = [viewer]
    browser = None
    try:
        wait_listening(open_url, viewer)
        browser = Browser(tmp_path / "profile")
        browser.open(open_url)
        said = browser.wait_for("document.getElementById('error-text').textContent", 60)
        assert "no aggregator state" in said
        # the aggregator serves its own dashboard, behind a token from the environment
        token = secrets.token_urlsafe(24)
        board_port = free_port()
        board = f"http://127.0.0.1:{board_port}/"
        aggregator, port = start_aggregator(
            ws,
            plan,
            *("--new-run", "--run-name", "live", "--quiet"),
            *("--dashboard", f"127.0.0.1:{board_port}"),
            env={**env, TOKEN_ENV: token},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append(aggregator)
        assert port is not None, aggregator.communicate(timeout=30)[0].decode()
        for site in SITES:
            procs.append(
                start_collaborator(
                    ws,
                    plan,
                    site,
                    port,
                    *("--state", str(states[site])),
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            )
        # without the token: 401, and not a word of the run
        for path in ("", "api/state", "index.html"):
            code, body = get(board + path)
            assert code == 401, (path, body)
            assert not re.search(rb"site-0|live|round|breast", body), body
        assert get(board + "api/state", "x" * len(token))[0] == 401
        browser.open(board)
        shown = browser.wait_for(
            f"location.port === '{board_port}' && document.body.innerText.includes('token') "
            "&& document.body.innerText",
            30,
        )
        assert "needs its token" in shown and "site-0" not in shown
        # with it: the data, and the page follows the federation round by round
        code, body = get(board + "api/state", token)
        assert code == 200 and json.loads(body)["run"]["name"] == "live"
        browser.open(f"{board}?token={token}")
        rounds: list[int] = []
        statuses: dict[str, list[str]] = {site: [] for site in SITES}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                seen = json.loads(browser.evaluate(SEEN) or "{}")
            except RuntimeError:  # the page is loading
                seen = {}
            number = re.match(r"round (\d+) of 8", seen.get("round", ""))
            if number and (not rounds or rounds[-1] != int(number.group(1))):
                rounds.append(int(number.group(1)))
            for site, status in seen.get("sites", {}).items():
                if not statuses[site] or statuses[site][-1] != status:
                    statuses[site].append(status)
            if rounds:  # the page has shown a round: the federation may go on
                gate.unlink(missing_ok=True)
            if len(rounds) >= 2 and any(len(s) >= 2 for s in statuses.values()):
                break
            assert aggregator.poll() is None, "the federation ended before the page showed it"
            time.sleep(0.2)
        assert len(rounds) >= 2 and rounds == sorted(rounds), (rounds, statuses)
        assert any(len(s) >= 2 for s in statuses.values()), (rounds, statuses)
        assert aggregator.wait(timeout=120) == 0, aggregator.communicate()[0].decode()
        # the standalone dashboard, the run over: every round, no error, site data shown
        data = json.loads(get(open_url + "api/state")[1])
        assert data["ok"] and data["run"]["status"] == "completed", data
        assert data["rounds"]["finished"] == 8 and set(data["curves"]) >= {"train_loss"}
        assert [s["site"] for s in data["sites"]] == list(SITES)
        browser.open(open_url)
        browser.wait_for(
            f"location.port === '{open_port}' && "
            "document.getElementById('round').textContent === 'round 8 of 8'"
        )
        assert browser.evaluate("document.getElementById('error').style.display") == "none"
        assert browser.evaluate("document.querySelectorAll('svg[data-metric]').length") >= 3
    finally:
        gate.unlink(missing_ok=True)
        if browser is not None:
            browser.close()
        stop(*procs)
    assert "dashboard of" in (viewer.stdout.read() if viewer.stdout else "")


def test_it_is_read_only_and_a_token_guards_every_request(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    board = Dashboard(tmp_path / "aggregator", port=0, token=token)
    board.start()
    try:
        url = board.url
        assert url.startswith("http://127.0.0.1:")
        assert get(url)[0] == 401
        code, body = get(url + "api/state", token)
        assert code == 200 and json.loads(body)["ok"] is False  # no state: said, served
        assert "no aggregator state" in json.loads(body)["error"]
        assert get(f"{url}?token={token}")[0] == 200
        assert get(url, token, method="HEAD") == (200, b"")
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            assert get(url + "api/state", token, method=method)[0] == 405, method
        assert get(url + "nothing", token)[0] == 404
    finally:
        board.close()
    assert not (tmp_path / "aggregator").exists()  # it wrote nothing
    # without a token: only a request addressed to this machine (no DNS rebinding)
    board = Dashboard(tmp_path / "aggregator", port=0)
    board.start()
    try:
        for host, code in (("evil.example:80", 403), ("localhost:9", 200), ("[::1]", 200)):
            request = urllib.request.Request(board.url + "api/state", headers={"Host": host})
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    assert (r.status, host) == (code, host)
            except urllib.error.HTTPError as err:
                assert (err.code, host) == (code, host)
                assert b"no aggregator state" not in err.read()
    finally:
        board.close()
    with pytest.raises(ValueError, match="needs a token"):
        Dashboard(tmp_path, host="0.0.0.0")  # noqa: S104
    with pytest.raises(ValueError, match="too short"):
        Dashboard(tmp_path, host="0.0.0.0", token="short")  # noqa: S104


def test_the_command_refuses_to_expose_it_without_a_token(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")
    env = {TOKEN_ENV: ""}
    refused = run_cli("dashboard", str(ws), "--host", "0.0.0.0", env=env)  # noqa: S104
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "needs a token" in refused.stderr and "--token-file" in refused.stderr
    empty = tmp_path / "token"
    empty.write_text("\n")
    refused = run_cli("dashboard", str(ws), "--token-file", str(empty), env=env)
    said = " ".join(refused.stderr.split())  # however a long path is wrapped
    assert refused.returncode == 2 and f"--token-file: {empty} is empty" in said, said


def test_the_cli_copies_of_the_dashboards_defaults_agree() -> None:
    from fedloom import dashboard
    from fedloom.cli import dashboard as cli

    assert (cli.DEFAULT_HOST, cli.DEFAULT_PORT, cli.TOKEN_ENV) == (
        dashboard.DEFAULT_HOST,
        dashboard.DEFAULT_PORT,
        dashboard.TOKEN_ENV,
    )
