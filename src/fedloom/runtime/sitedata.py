"""Where a simulated site's data comes from.

Built-in datasets are loaded once per process, the test set held out before anything
is partitioned, and the partition computed deterministically from the plan's seed,
so every worker process agrees on which sample belongs to which site. A site's arrays
are sliced when it works and dropped afterwards: 1,000 sites never sit in memory at once.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from fedloom.data import (
    load_dataset,
    parse_partition,
    partition,
    synthetic_split,
    synthetic_test_set,
    train_val_split,
)
from fedloom.data.datasets import SYNTHETIC_CLASSES
from fedloom.errors import PlanError, TaskError, WorkspaceError
from fedloom.plan import PLAN_FILE, Plan
from fedloom.rng import generator, int_seed
from fedloom.tasks.base import SiteContext, SiteData, Task


class DataSource:
    """Site data, the held-out test set and the pooled training data of a plan."""

    def __init__(self, plan: Plan, workspace: Path, task: Task) -> None:
        self.plan = plan
        self.workspace = workspace
        self.task = task
        self.roster = plan.roster
        self._index = {site: i for i, site in enumerate(self.roster)}

    @property
    def kind(self) -> str:
        return self.plan.data.dataset

    @cached_property
    def _dataset(self):  # type: ignore[no-untyped-def]
        return load_dataset(self.kind, self.plan.seed, self.plan.data.test_fraction)

    @cached_property
    def _partition(self) -> list[np.ndarray]:
        spec = parse_partition(self.plan.data.partition)
        rng = generator(self.plan.seed, 0, "", "partition")
        try:
            return partition(self._dataset.y_train, len(self.roster), spec, rng)
        except ValueError as err:
            source = str(self.workspace / PLAN_FILE)
            raise PlanError([f"data.partition: {err}"], source=source) from err

    def prepare(self) -> None:
        """Load the dataset and make the partition now, so a problem shows at start."""
        if self.kind not in ("custom", "synthetic"):
            _ = self._partition

    @property
    def num_classes(self) -> int:
        if self.kind == "synthetic":
            return SYNTHETIC_CLASSES
        if self.kind == "custom":
            return int(getattr(self.task, "num_classes", 0)) or 2
        return int(self._dataset.num_classes)

    def site_data(self, site: str) -> SiteData:
        index = self._index[site]
        if self.kind == "custom":
            return self._custom(site, index)
        if self.kind == "synthetic":
            syn = self.plan.data.synthetic
            (x, y), _ = synthetic_split(
                index,
                alpha=syn.alpha,
                beta=syn.beta,
                seed=self.plan.seed,
                test_fraction=self.plan.data.test_fraction,
            )
            pool = np.arange(len(y))
        else:
            x, y = self._dataset.x_train, self._dataset.y_train
            pool = self._partition[index]
        rng = generator(self.plan.seed, 0, site, "val-split")
        train, val = train_val_split(pool, self.plan.data.val_fraction, rng)
        return SiteData(x[train], y[train], x[val], y[val])

    def test_set(self) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "synthetic":
            syn = self.plan.data.synthetic
            return synthetic_test_set(
                len(self.roster),
                alpha=syn.alpha,
                beta=syn.beta,
                seed=self.plan.seed,
                test_fraction=self.plan.data.test_fraction,
            )
        if self.kind == "custom":
            loader = getattr(self.task, "load_test_data", None)
            if loader is None:
                return np.zeros((0, 1), np.float32), np.zeros((0,), np.int64)
            x, y = loader()
            return np.asarray(x), np.asarray(y)
        return self._dataset.x_test, self._dataset.y_test

    def pooled_train(self) -> SiteData:
        """Every site's training data in one place: the centralised baseline."""
        parts = [self.site_data(s) for s in self.roster]
        return SiteData(
            np.concatenate([p.x_train for p in parts]),
            np.concatenate([p.y_train for p in parts]),
            np.concatenate([p.x_val for p in parts]),
            np.concatenate([p.y_val for p in parts]),
        )

    def _custom(self, site: str, index: int) -> SiteData:
        loader = getattr(self.task, "load_data", None)
        if loader is None:
            raise WorkspaceError(
                "data.dataset is 'custom' but the task defines no load_data(context)",
                hint="add load_data to the task, or pick a built-in dataset",
            )
        data = loader(SiteContext(site, index, 0, int_seed(self.plan.seed, 0, site, "data")))
        if not isinstance(data, SiteData):
            raise TaskError(f"load_data returned {type(data).__name__}, expected SiteData")
        return data
