"""``fedloom report RUN``: one self-contained HTML page of a run folder, whose figures are
the run's own, read from its files; a run in which a site failed shows the failure."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from workspaces import make_workspace, run_cli, write_training_twist

from fedloom.html_report import round_curves


def test_curves_are_the_sample_weighted_mean_of_each_rounds_last_attempt() -> None:
    rows = [
        {"round": 1, "attempt": 1, "kind": "train", "status": "ok", "site": "a",
         "num_samples": 10, "train_loss": 9.0, "val_samples": 3.0},
        {"round": 1, "attempt": 2, "kind": "train", "status": "ok", "site": "a",
         "num_samples": 30, "train_loss": 1.0},
        {"round": 1, "attempt": 2, "kind": "train", "status": "ok", "site": "b",
         "num_samples": 10, "train_loss": 5.0},
        {"round": 1, "attempt": 2, "kind": "train", "status": "error", "site": "c"},
        {"round": 2, "attempt": 1, "kind": "train", "status": "ok", "site": "a",
         "num_samples": 10, "train_loss": float("nan")},
        {"round": 3, "attempt": 1, "kind": "evaluate", "status": "ok", "site": "a",
         "num_samples": 10, "train_loss": 7.0},
    ]  # fmt: skip
    assert round_curves(rows) == {"train_loss": [(1, 2.0)]}


class Page(HTMLParser):
    """The page's text, its tables' cells and every address it would load."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.cells: list[str] = []
        self.loads: list[str] = []
        self.images = 0
        self._in_cell = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key in ("src", "href") and value is not None:
                if value.startswith("data:image/png;base64,"):
                    self.images += 1
                else:
                    self.loads.append(value)
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag: str) -> None:
        self._in_cell = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_cell:
            self.cells.append(data)


@pytest.mark.process
def test_the_report_shows_the_runs_own_figures_and_its_failures(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path, "breast-cancer", "ws")
    write_training_twist(
        ws, "if context.site == 'site-02' and context.round == 2: raise ValueError('disk gone')"
    )
    done = run_cli(
        "simulate", str(ws), "--rounds", "3", "--sites", "3", "--workers", "0",
        "--run-name", "r", "--quiet", "deadline.min_fraction=0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    run = ws / "runs" / "r"
    made = run_cli("report", str(run))
    assert made.returncode == 0, made.stdout + made.stderr
    page = Page((run / "report.html").read_text())
    summary = json.loads((run / "summary.json").read_text())
    text = " ".join(page.text)
    assert summary["plan_hash"] in text
    assert page.loads == []  # nothing from anywhere: the images are embedded
    assert page.images >= 2  # the curves and the run's accuracy.png
    # the sites' table holds each site's final evaluation, as metrics.jsonl has it
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r["kind"] == "evaluate"]
    assert {r["site"] for r in final} == {"site-01", "site-02", "site-03"}
    for r in final:
        assert f"{r['global_accuracy']:.6g}" in page.cells
    assert f"{summary['test_accuracy']:.6g}" in page.cells
    # the failure, with the task's own words
    failed = [r for r in rows if r["status"] != "ok"]
    assert [(r["round"], r["site"]) for r in failed] == [(2, "site-02")]
    assert any("disk gone" in cell for cell in page.cells)
    assert "No differential privacy in this run." in text

    elsewhere = tmp_path / "out" / "page.html"
    elsewhere.parent.mkdir()
    assert run_cli("report", str(run), "--out", str(elsewhere)).returncode == 0
    assert elsewhere.read_text() == (run / "report.html").read_text()
    missing = run_cli("report", str(ws))
    assert missing.returncode == 3 and "is not a run folder: it has no summary.json" in (
        missing.stderr
    )
