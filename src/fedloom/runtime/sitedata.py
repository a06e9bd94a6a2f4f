"""Where a simulated site's data comes from.

Built-in datasets are loaded once per process, the test set held out before anything
is partitioned, and the partition computed deterministically from the plan's seed,
so every worker process agrees on which sample belongs to which site. A site's arrays
are sliced when it works and dropped afterwards: 1,000 sites never sit in memory at once.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.core.errors import PlanError, TaskError, WorkspaceError
from fedloom.core.rng import generator, int_seed
from fedloom.data import (
    load_dataset,
    parse_partition,
    partition,
    synthetic_split,
    synthetic_test_set,
    train_val_split,
)
from fedloom.data.datasets import SYNTHETIC_CLASSES
from fedloom.plan import PLAN_FILE, Plan
from fedloom.tasks.base import (
    AnySiteData,
    Classifier,
    LoadsData,
    LoadsTestData,
    SiteContext,
    SiteData,
    SiteDatasets,
    Split,
    Task,
)

TEST_FOLDER = "test"  # data.path/test: the held-out test set of a data folder


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
        labels = self._dataset.y_train
        if self._dataset.regression:  # iid or quantity (the plan refuses the others)
            labels = np.zeros(len(labels), np.int64)
        try:
            return partition(labels, len(self.roster), spec, rng)
        except ValueError as err:
            source = str(self.workspace / PLAN_FILE)
            raise PlanError([f"data.partition: {err}"], source=source) from err

    def prepare(self) -> None:
        """Load the dataset and make the partition now, so a problem shows at start."""
        if self.kind not in ("custom", "synthetic"):
            _ = self._partition

    @property
    def num_classes(self) -> int:
        """How many classes the labels name (0 for a regression dataset's targets)."""
        if self.kind == "synthetic":
            return SYNTHETIC_CLASSES
        if self.kind == "custom":
            return self.task.num_classes if isinstance(self.task, Classifier) else 2
        return int(self._dataset.num_classes or 0)

    def data_path(self, site: str) -> Path | None:
        """Where ``site``'s data lies in a simulation: ``data.path/<site>`` (None when
        the plan names no data folder)."""
        if self.plan.data.path is None:
            return None
        return self.workspace / self.plan.data.path / site

    def site_data(self, site: str) -> AnySiteData:
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

    def test_set(self) -> Any:
        """The held-out test set: a :class:`Split` of arrays, or a custom task's own."""
        if self.kind == "synthetic":
            syn = self.plan.data.synthetic
            return Split(
                *synthetic_test_set(
                    len(self.roster),
                    alpha=syn.alpha,
                    beta=syn.beta,
                    seed=self.plan.seed,
                    test_fraction=self.plan.data.test_fraction,
                )
            )
        if self.kind == "custom":
            return self.custom_test_set()
        return Split(self._dataset.x_test, self._dataset.y_test)

    def custom_test_set(self) -> Any:
        """A custom task's test set (its ``load_test_data``), or an empty split."""
        test = None
        if isinstance(self.task, LoadsTestData):
            path = None
            if self.plan.data.path is not None:
                path = self.workspace / self.plan.data.path / TEST_FOLDER
            seed = int_seed(self.plan.seed, 0, TEST_FOLDER, "data")
            test = self.task.load_test_data(SiteContext(TEST_FOLDER, -1, 0, seed, data_path=path))
        if test is None:
            return Split(np.zeros((0, 1), np.float32), np.zeros((0,), np.int64))
        if isinstance(test, tuple) and len(test) == 2 and not isinstance(test, Split):
            return Split(np.asarray(test[0]), np.asarray(test[1]))
        return test

    def pooled_train(self) -> AnySiteData:
        """Every site's training data in one place: the centralised baseline."""
        parts = [self.site_data(s) for s in self.roster]
        if all(isinstance(p, SiteData) for p in parts):
            arrays = [p for p in parts if isinstance(p, SiteData)]
            return SiteData(
                np.concatenate([p.x_train for p in arrays]),
                np.concatenate([p.y_train for p in arrays]),
                np.concatenate([p.x_val for p in arrays]),
                np.concatenate([p.y_val for p in arrays]),
            )
        return SiteDatasets(
            _concatenated([p.train for p in parts]), _concatenated([p.val for p in parts])
        )

    def _custom(self, site: str, index: int) -> AnySiteData:
        context = SiteContext(
            site,
            index,
            0,
            int_seed(self.plan.seed, 0, site, "data"),
            data_path=self.data_path(site),
            total_rounds=self.plan.rounds,
        )
        data = self.task.load_data(context) if isinstance(self.task, LoadsData) else None
        if data is None:
            raise WorkspaceError(
                "data.dataset is 'custom' but the task builds no data of its own",
                hint="give the task a data function (TorchLoop(..., data=load)) or a "
                "load_data(context) method, or pick a built-in dataset",
            )
        if isinstance(data, tuple) and len(data) == 2:
            data = SiteDatasets(data[0], data[1])
        if not isinstance(data, SiteData | SiteDatasets):
            raise TaskError(
                f"load_data returned {type(data).__name__}, expected SiteData, "
                "SiteDatasets or a (train, val) pair"
            )
        return data


def _concatenated(parts: list[Any]) -> Any:
    """The sites' datasets as one: a list's items, or torch's ``ConcatDataset``."""
    if all(isinstance(p, list | tuple) for p in parts):
        return [item for p in parts for item in p]
    from torch.utils.data import ConcatDataset

    return ConcatDataset(parts)


def classes_of(source: DataSource) -> int | None:
    """How many classes a site's labels may name: the built-in dataset's, or a custom
    task's ``num_classes``; None when neither says (a custom task's labels are its own)
    or the targets are a regression's numbers (``diabetes``)."""
    if source.kind != "custom":
        return source.num_classes or None
    declared = source.task.num_classes if isinstance(source.task, Classifier) else None
    return declared if isinstance(declared, int) and declared > 0 else None


def data_problems(data: SiteData, num_classes: int | None) -> list[str]:
    """Everything wrong with a site's data, before any of it is trained on: each split's
    rows (at least one to train on; features and labels of the same length), feature
    shapes that agree between the splits, numeric and finite features, and labels that
    are integers in ``[0, num_classes)`` (when the number of classes is known)."""
    problems: list[str] = []
    splits = (("train", data.x_train, data.y_train), ("val", data.x_val, data.y_val))
    for split, x, y in splits:
        xn, yn = f"x_{split}", f"y_{split}"
        if x.ndim == 0 or y.ndim == 0:
            problems.append(f"{xn} and {yn} must have one row per sample (found a scalar)")
            continue
        if len(x) != len(y):
            problems.append(f"{xn} has {len(x)} rows but {yn} has {len(y)}: one label per sample")
        problems += _feature_problems(xn, x)
        problems += _label_problems(yn, y, num_classes)
    if data.x_train.ndim > 0 and len(data.x_train) == 0:
        problems.append("x_train has 0 rows: there is nothing to train on")
    if (
        data.x_train.ndim > 0
        and data.x_val.ndim > 0
        and len(data.x_val) > 0
        and data.x_train.shape[1:] != data.x_val.shape[1:]
    ):
        problems.append(
            f"x_train's rows have shape {data.x_train.shape[1:]} but x_val's have "
            f"{data.x_val.shape[1:]}"
        )
    return problems


def _feature_problems(name: str, x: np.ndarray) -> list[str]:
    if not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)):
        return [f"{name} holds {x.dtype} values: features must be numbers"]
    if np.issubdtype(x.dtype, np.inexact):
        bad = ~np.isfinite(x)
        if bad.any():
            rows = np.flatnonzero(bad.reshape(len(x), -1).any(axis=1)) if x.ndim > 1 else None
            where = f", first in row {int(rows[0])}" if rows is not None and len(rows) else ""
            return [
                f"{name} has {int(bad.sum())} NaN or infinite value(s){where}: "
                "fill or drop them before training"
            ]
    return []


def _label_problems(name: str, y: np.ndarray, num_classes: int | None) -> list[str]:
    if np.issubdtype(y.dtype, np.integer):
        if num_classes is not None and len(y):
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= num_classes:
                outside = int(((y < 0) | (y >= num_classes)).sum())
                return [
                    f"{name} has {outside} label(s) outside 0..{num_classes - 1} "
                    f"(found {low}..{high}): the model has {num_classes} classes"
                ]
        return []
    if not np.issubdtype(y.dtype, np.number) and not np.issubdtype(y.dtype, np.bool_):
        return [f"{name} holds {y.dtype} values: labels must be integer class indices"]
    if num_classes is None:
        return []  # a custom task's labels may be what it likes (a regression's floats)
    return [
        f"{name} holds {y.dtype} values: labels must be integer class indices "
        f"0..{num_classes - 1} (convert them, e.g. y.astype(np.int64), if they are whole)"
    ]
