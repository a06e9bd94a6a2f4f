"""The task API as the docs show it: every complete example in docs/tasks.md and
docs/from-flower.md runs, and what the examples revealed stays fixed (a user's loop sees
the round's training settings; a task of the older interface is refused as it loads; a
data folder needs custom data)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedloom import PlanError, SimulationOptions, TrainSettings, WorkspaceError, load_plan, simulate
from fedloom.tasks import SiteContext, SiteDatasets, TorchLoop
from fedloom.tasks.loader import load_task

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"((?:<!-- example: \S+ -->\n)+)\n*```\w*\n(.*?)```", re.S)
MARK = re.compile(r"<!-- example: ([\w.-]+)/([\w./-]+) -->")


def _examples() -> dict[str, dict[str, str]]:
    """The docs' complete examples: workspace name -> {file: text}, from each fenced
    block preceded by ``<!-- example: NAME/FILE -->`` lines (a block may belong to
    several examples; blocks marked with the same file are joined, in order)."""
    found: dict[str, dict[str, str]] = {}
    for page in ("tasks.md", "from-flower.md"):
        for marks, text in BLOCK.findall((DOCS / page).read_text(encoding="utf-8")):
            for name, file in MARK.findall(marks):
                files = found.setdefault(name, {})
                files[file] = files.get(file, "") + text
    return found


EXAMPLES = _examples()


def test_the_docs_mark_their_examples() -> None:
    assert {"csv-clinics", "wine-numpy", "wine-custom"} <= EXAMPLES.keys()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_an_example_of_the_docs_runs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = tmp_path / name
    for file, text in EXAMPLES[name].items():
        (ws / file).parent.mkdir(parents=True, exist_ok=True)
        (ws / file).write_text(text, encoding="utf-8")
    if (ws / "make_data.py").is_file():  # run where the docs run it: in the workspace
        monkeypatch.chdir(ws)
        runpy.run_path(str(ws / "make_data.py"), run_name="__main__")
    result = simulate(ws, load_plan(ws, ["rounds=2"]), SimulationOptions(workers=0))
    failures = [f for r in result.history for f in r.failures]
    assert not failures
    assert result.test_metrics and all(np.isfinite(v) for v in result.test_metrics.values())


def _settings_seen(tmp: list[TrainSettings]) -> TorchLoop:
    def train(model: nn.Module, data: object, ctx: SiteContext) -> None:
        tmp.append(ctx.settings)

    def evaluate(model: nn.Module, data: object, ctx: SiteContext) -> dict[str, float]:
        return {"accuracy": 0.0}

    return TorchLoop(lambda: nn.Linear(2, 2), train, evaluate)


def test_a_user_loop_receives_the_rounds_training_settings() -> None:
    seen: list[TrainSettings] = []
    task = _settings_seen(seen)
    data = SiteDatasets(TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)))
    settings = TrainSettings(epochs=3, lr=0.2, proximal_mu=0.1)
    task.train(task.init_weights(0), data, settings, SiteContext("site-a", 0, 1, 7))
    assert seen == [settings]  # FedProx's mu reaches a loop that adds the proximal term


def test_a_task_of_the_older_interface_is_refused_as_it_loads(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text(
        "from fedloom.tasks import SoftmaxRegression\n"
        "class Old(SoftmaxRegression):\n"
        "    def load_test_data(self):\n"
        "        return None\n"
        "    def evaluate(self, weights, x, y):\n"
        "        return None\n"
        "task = Old(4, 2)\n"
    )
    with pytest.raises(WorkspaceError) as err:
        load_task(tmp_path)
    assert "evaluate(weights, x, y) now receives (weights, data, context)" in str(err.value)
    assert "load_test_data() now receives the context" in str(err.value)
    assert "migrating" in (err.value.hint or "")


def test_a_data_folder_is_read_with_custom_data_only(tmp_path: Path) -> None:
    (tmp_path / "federation.yaml").write_text("data: {dataset: digits, path: data}\n")
    with pytest.raises(PlanError, match="data.path: .* with dataset: custom only"):
        load_plan(tmp_path)
    assert load_plan(tmp_path, ["data.dataset=custom"]).data.path == "data"
