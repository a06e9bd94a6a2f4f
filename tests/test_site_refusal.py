"""A site whose data does not fit the model is refused alone: it tells the aggregator
that it withdraws and why, exits, and the others finish the federation with quorum,
without any round waiting for it. Real OS processes over mutual-TLS gRPC first, then
the aggregator's side in-process (a manual clock: no deadline ever passes) and over a
real gRPC server."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import attempt_id, make_tiny_weights
from test_deploy import finish, kill_leftovers, rows_by_round, start_aggregator, start_site
from workspaces import make_workspace, run_cli

from fedloom.collaborator import withdraw
from fedloom.core.errors import QuorumError
from fedloom.core.events import Resume, SiteAnswered, SiteRejoined, SiteWithdrew
from fedloom.core.records import CloseReason, Failure, FailureKind, Instruction, SiteAnswer
from fedloom.core.state import FederationState
from fedloom.core.weights import Weights
from fedloom.pki import provision
from fedloom.store.status import read_status
from fedloom.transport.messages import FailureReport

pytestmark = pytest.mark.server

SITES = ("site-01", "site-02", "site-03")

# ---------------------------------------------------------- real processes, gRPC


def test_a_site_whose_data_has_the_wrong_width_is_refused_alone_and_the_others_finish(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")  # a model of 30 features
    bad = tmp_path / "site-03.npz"
    rng = np.random.default_rng(0)
    np.savez(bad, x=rng.normal(size=(40, 7)), y=rng.integers(0, 2, size=40))
    # Neither the deadline nor silence can drop a site here: a round closes early only
    # because the aggregator was told.
    plan = ["sites=3", "rounds=2", "deadline.min_fraction=0.6", "deadline.round_seconds=600"]
    provision(ws, list(SITES))
    aggregator, port = start_aggregator(ws, plan, "refused", "--dead-after", "600")
    sites = [start_site(ws, plan, s, port) for s in SITES[:2]]
    try:
        refused = start_site(ws, plan, "site-03", port, "--data", str(bad))
        screen = refused.communicate(timeout=120)[0].decode()
        assert refused.returncode == 3, screen  # DataError
        assert "error: the site's data" in screen, screen
        assert "the model does not fit it" in screen and "(7,)" in screen, screen
        assert "the aggregator was told that this site withdraws" in screen, screen
        finish(aggregator, sites)
    finally:
        kill_leftovers(aggregator, *sites)

    log = (ws / "aggregator" / "aggregator.log").read_text()
    (line,) = [x for x in log.splitlines() if "site-03 withdrew from the federation" in x]
    assert "WARNING" in line and "the model does not fit it" in line and "(7,)" in line, line
    summary = json.loads((ws / "runs" / "refused" / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    by_round = rows_by_round(ws / "runs" / "refused")
    for rnd in (1, 2, 3):  # two training rounds and the final evaluation
        row = by_round[rnd]["site-03"]
        assert row["status"] == "withdrawn", row
        assert row["reason"].startswith("withdrew from the federation: the site's data"), row
        assert row["close_reason"] == CloseReason.QUORUM.value, row
        assert {by_round[rnd][s]["status"] for s in SITES[:2]} == {"ok"}
    # the site's own log, and its audit log (the withdrawal left the site: it is recorded)
    site_log = (ws / "sites" / "site-03" / "collaborator.log").read_text()
    assert "told the aggregator that this site withdraws" in site_log
    audit = (ws / "sites" / "site-03" / "audit.jsonl").read_text().splitlines()
    assert [json.loads(r)["kind"] for r in audit] == ["withdrawal"]
    # `fedloom status` names the site and why, after the run
    sites_status = {s["site"]: s for s in read_status(ws / "aggregator")["sites"]}
    assert "the model does not fit it" in sites_status["site-03"]["withdrawn"]
    assert sites_status["site-01"]["withdrawn"] is None
    with sqlite3.connect(ws / "aggregator" / "state.db") as db:
        kinds = [k for (k,) in db.execute("SELECT kind FROM events WHERE site = 'site-03'")]
    assert "withdrew" in kinds


TORCH_LOOP_TASK = """
import numpy as np
import torch
from PIL import Image
from torch import nn
from fedloom.tasks import TorchLoop


class Folder(torch.utils.data.Dataset):
    def __init__(self, root):
        self.files = sorted(root.glob("*.png"))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = np.asarray(Image.open(self.files[i]), dtype=np.float32) / 255
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        return torch.from_numpy(image.copy()), 0


def data(ctx):
    return Folder(ctx.data_path), Folder(ctx.data_path)


def model():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))


def train(model, dataset, ctx):
    return None


def evaluate(model, dataset, ctx):
    x, _ = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    return {"accuracy": float(model(x).argmax(1).eq(0).float().mean())}


task = TorchLoop(model, train, evaluate, data=data)
"""


def test_a_folder_of_colour_images_for_a_grey_model_is_refused_before_joining(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    from PIL import Image

    ws = make_workspace(tmp_path, "breast-cancer")
    (ws / "task.py").write_text(
        TORCH_LOOP_TASK.replace("nn.LazyLinear(2)", "nn.Linear(2 * 6 * 6, 2)")
    )
    folder = tmp_path / "images"  # RGB images: 3 channels, the model takes 1
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    provision(ws, ["site-01"])
    # no aggregator is listening: the site says why on its screen all the same
    done = run_cli(
        "collaborator", "start", str(ws), "sites=1", "--name", "site-01",
        "--aggregator", "127.0.0.1:9", "--data", str(folder), "--give-up-after", "1",
        timeout=120,
    )  # fmt: skip
    screen = done.stdout + done.stderr
    assert done.returncode == 3, screen
    assert f"error: the site's data {folder}: the model does not fit it" in screen, screen
    assert "channels" in screen, screen  # torch's own words: 3 channels, expected 1
    assert "the aggregator could not be told" in screen, screen


def test_a_device_the_machine_lacks_is_refused_and_an_unknown_one_is_a_usage_error(
    tmp_path: Path,
) -> None:
    ws = make_workspace(tmp_path, "breast-cancer")  # NumPy: no torch, so no CUDA device
    provision(ws, ["site-01"])
    common = ("collaborator", "start", str(ws), "sites=1", "--name", "site-01")
    where = ("--aggregator", "127.0.0.1:9", "--give-up-after", "1")
    unknown = run_cli(*common, *where, "--device", "gpu", timeout=60)
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "must be auto, cpu, cuda, cuda:N or mps (got 'gpu')" in unknown.stderr
    missing = run_cli(*common, *where, "--device", "cuda:1", timeout=120)
    screen = missing.stdout + missing.stderr
    assert missing.returncode == 3, screen  # DeviceError, before joining
    assert "error: device 'cuda:1' asked for, but the task does not use torch" in screen, screen
    assert "the aggregator could not be told" in screen, screen


# ------------------------------------------------- the aggregator's side, in-process


def model() -> Weights:
    return make_tiny_weights()  # what the shift runners train


def test_a_site_that_withdrew_is_counted_failed_at_once_in_every_round(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), min_fraction=0.6, rounds=2)
    withdraw(fed.connect("site-a"), "x has 7 features, the model takes 30")
    fed.start_site("site-b", shift_runner(1, 20))
    fed.start_site("site-c", shift_runner(2, 30))
    fed.start()
    history = fed.finish()  # no deadline passes: nobody waits for site-a

    assert [r.round for r in history] == [1, 2, 3]
    reason = "withdrew from the federation: x has 7 features, the model takes 30"
    for record in history:
        assert record.failures == (Failure("site-a", record.round, FailureKind.WITHDRAWN, reason),)
        assert [r.site for r in record.results] == ["site-b", "site-c"]
        assert record.close_reason is CloseReason.QUORUM
    events = fed.log.snapshot()
    assert SiteWithdrew("site-a", "x has 7 features, the model takes 30") in events
    assert SiteAnswered(1, "site-a", False, reason) in events
    assert fed.aggregator.snapshot()["withdrawn"] == {
        "site-a": "x has 7 features, the model takes 30"
    }


def test_a_withdrawal_while_the_round_waits_for_the_site_settles_it(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), min_fraction=0.6, rounds=1, final_evaluation=False)
    fed.start_site("site-b", shift_runner(1, 20))
    fed.start_site("site-c", shift_runner(2, 30))
    fed.start()
    fed.log.wait_answered(1, 2)
    assert not fed.log.closed()  # it waits for site-a
    fed.connect("site-a").report_failure(FailureReport(0, "no GPU", withdrawn=True))
    (record,) = fed.finish()
    assert record.failures == (
        Failure("site-a", 1, FailureKind.WITHDRAWN, "withdrew from the federation: no GPU"),
    )
    assert record.close_reason is CloseReason.QUORUM


def test_too_many_withdrawals_fail_the_round_for_want_of_quorum_at_once(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), min_fraction=0.6, rounds=1, final_evaluation=False)
    for site in ("site-a", "site-b"):
        withdraw(fed.connect(site), "wrong number of channels")
    fed.start_site("site-c", shift_runner(2, 30))
    fed.start()
    with pytest.raises(QuorumError, match="0 of 3 sites answered") as raised:
        fed.finish()  # no deadline passes: site-c is not waited for either
    why = str(raised.value)
    assert "2 site(s), e.g. site-a: withdrew from the federation: wrong number of channels" in why
    assert "site-c: not waited for: the round could no longer reach its quorum" in why


def test_a_withdrawn_site_that_says_hello_again_takes_part_again(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), min_fraction=0.6, rounds=2, final_evaluation=False)
    withdraw(fed.connect("site-a"), "bad data")
    held = threading.Event()
    plain = shift_runner(1, 20)

    def slow(instruction: Instruction, weights: Weights) -> SiteAnswer:
        if instruction.round == 1:
            held.wait(10)  # round 1 stays open until the test lets it close
        return plain(instruction, weights)

    fed.start_site("site-b", slow)
    fed.start_site("site-c", shift_runner(2, 30))
    fed.start()
    fed.log.wait_until(
        lambda evs: (
            SiteAnswered(1, "site-a", False, "withdrew from the federation: bad data") in evs
        ),
        "site-a counted failed in round 1",
    )
    fed.aggregator.join("site-a")  # its fixed process said Hello
    fed.start_site("site-a", shift_runner(0, 10))
    held.set()
    first, second = fed.finish()
    assert [f.site for f in first.failures] == ["site-a"]
    assert [r.site for r in second.results] == ["site-a", "site-b", "site-c"]
    assert second.failures == ()
    assert SiteRejoined("site-a") in fed.log.snapshot()
    assert fed.aggregator.withdrawn == {}


def test_a_restarted_aggregator_still_does_not_wait_for_a_site_that_withdrew(
    make_federation: Any, shift_runner: Any
) -> None:
    from fedloom.strategies import FedAvg

    state = FedAvg().init(model())
    resume = Resume(FederationState(state), next_round=1, withdrawn={"site-a": "bad data"})
    fed = make_federation(model(), min_fraction=0.6, rounds=1, resume=resume)
    fed.start_site("site-b", shift_runner(1, 20))
    fed.start_site("site-c", shift_runner(2, 30))
    fed.start()
    train, evaluation = fed.finish()
    assert [f.kind for f in train.failures + evaluation.failures] == [FailureKind.WITHDRAWN] * 2


def test_a_failure_report_that_is_not_a_withdrawal_withdraws_nothing(
    make_federation: Any, shift_runner: Any
) -> None:
    fed = make_federation(model(), min_fraction=0.6, rounds=2, final_evaluation=False)
    fed.start_site("site-b", shift_runner(1, 20))
    fed.start_site("site-c", shift_runner(2, 30))
    fed.start()
    fed.log.wait_opened(1)
    fed.connect("site-a").report_failure(FailureReport(1, "out of memory", attempt_id(1)))
    fed.log.wait_opened(2)
    assert fed.aggregator.withdrawn == {}
    fed.start_site("site-a", shift_runner(0, 10))
    first, second = fed.finish()
    assert first.failures[0].kind is FailureKind.ERROR
    assert [r.site for r in second.results] == ["site-a", "site-b", "site-c"]


# ----------------------------------------------- the aggregator's side, over gRPC


def test_over_grpc_a_withdrawal_is_logged_ends_its_session_and_a_new_hello_clears_it(
    make_grpc_federation: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fed = make_grpc_federation(min_fraction=0.6, rounds=1)
    grpc = fed.transport
    refused = grpc.connect("site-a")
    with caplog.at_level(logging.WARNING, logger="fedloom.aggregator"):
        refused.open()
        withdraw(refused, "x has 7 features, the model takes 30")
    (line,) = [r.getMessage() for r in caplog.records if "withdrew" in r.getMessage()]
    assert line.startswith("site site-a withdrew from the federation: x has 7 features"), line
    # its process exits: the aggregator does not wait to tell it the federation finished
    assert "site-a" not in {s.site for s in grpc.server.sessions()}
    assert fed.aggregator.withdrawn == {"site-a": "x has 7 features, the model takes 30"}
    again = grpc.connect("site-a")  # started again: a new process, the same certificate
    again.open()
    assert fed.aggregator.withdrawn == {}
    assert SiteRejoined("site-a") in fed.log.snapshot()
