"""The task of an analysis plan: what a site runs instead of training.

Its "model" is the release (every statistic's block of sums, all zero to begin with);
its one round computes this site's blocks on its table, withholds the cells under the
plan's ``min_count``, adds the DP noise if the plan asks for it (charged to the site's
own privacy count first), and returns them as the update, with weight 1: the round's
mean times the number of sites is the sum. Nothing else leaves the site: no metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedloom.analysis.query import AnalysisPlan
from fedloom.analysis.sums import empty_release, largest, noised, rows_of, site_release
from fedloom.analysis.table import Table, read_table, table_of_arrays
from fedloom.core.errors import TaskError
from fedloom.core.records import Accountant, EvalOutput, TrainOutput, TrainSettings
from fedloom.core.weights import Weights
from fedloom.privacy.budget import SPENT_FILE, SiteBudget
from fedloom.privacy.dp import secret_generator
from fedloom.tasks.base import SiteContext, SiteData, SiteDatasets


class StatisticsTask:
    """A site's side of a federated analysis (``analysis:`` in the plan)."""

    def __init__(
        self,
        plan: AnalysisPlan,
        *,
        plan_hash: str,
        accountant: Accountant = Accountant.RDP,
        clip_range: float | None = None,  # secure aggregation's encodable range
    ) -> None:
        self.plan = plan
        self.plan_hash = plan_hash
        self.accountant = accountant
        self.clip_range = clip_range

    def init_weights(self, seed: int) -> Weights:
        return empty_release(self.plan)

    def load_data(self, context: SiteContext) -> SiteDatasets:
        """The site's table: ``analysis.table`` in its data folder."""
        if context.data_path is None:
            raise TaskError(
                f"{context.site} has no data folder to read {self.plan.table} from",
                hint="give the collaborator --data FOLDER, or the plan data.path",
            )
        return SiteDatasets(TableData(read_table(Path(context.data_path) / self.plan.table)))

    def train(
        self, weights: Weights, data: Any, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        release, _ = site_release(table_of(data), self.plan, context.site)
        metrics: dict[str, float] = {}
        if self.plan.dp is not None:
            metrics["analysis_epsilon"] = self._charge(context)
            release = noised(release, self.plan, secret_generator())
        biggest = largest(release)
        if self.clip_range is not None and biggest > self.clip_range:
            raise TaskError(
                f"a statistic of this site is {biggest:.6g}, beyond secure aggregation's "
                f"clip_range {self.clip_range:g}: it would be clipped, and the sum wrong",
                hint="raise privacy.secure_aggregation.clip_range (with bits: 64)",
            )
        out = {name: weights[name] + value for name, value in release.items()}
        return TrainOutput(out, 1, metrics)

    def evaluate(self, weights: Weights, data: Any, context: SiteContext) -> EvalOutput:
        return EvalOutput(0, {})

    def _charge(self, context: SiteContext) -> float:
        """Count the release in the site's privacy count (refused past the budget) and
        return the epsilon spent with it."""
        dp = self.plan.dp
        assert dp is not None  # noqa: S101 - called only under dp
        if context.state_dir is None or dp.epsilon_budget is None:
            return dp.epsilon(self.accountant)
        budget = SiteBudget(
            Path(context.state_dir) / SPENT_FILE,
            plan_hash=self.plan_hash,
            noise_multiplier=dp.noise_multiplier,
            delta=dp.delta,
            limit=dp.epsilon_budget,
            accountant=self.accountant,
        )
        return budget.charge(context.round)


class TableData:
    """A site's table as a dataset (its length is its number of rows)."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __len__(self) -> int:
        return rows_of(self.table)


def table_of(data: Any) -> Table:
    """The table of a site's data: its own CSV, or a built-in dataset's share."""
    if isinstance(data, SiteDatasets) and isinstance(data.train, TableData):
        return data.train.table
    if isinstance(data, SiteData):
        x = np.concatenate([data.x_train, data.x_val])  # every row the site holds
        return table_of_arrays(x, np.concatenate([data.y_train, data.y_val]))
    raise TaskError(
        f"an analysis reads a table; this site's data is {type(data).__name__}",
        hint="use dataset: custom with analysis.table, or a built-in tabular dataset",
    )
