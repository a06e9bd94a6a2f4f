"""The plan's ``analysis:`` section: which statistics a federated analysis asks of every
site's table, the minimum count below which a site withholds a cell, and optional DP
noise (docs/analysis.md).

Every statistic is computed from sums a site can add to the others' (so secure
aggregation can sum them): counts, sums and sums of squares, histogram counts. Quantiles,
min and max come from a fine histogram (a *sketch*) over a declared range, so they are
approximate to within one sketch bin, and never one record's exact value.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field, model_validator

from fedloom.core.frozen import Frozen
from fedloom.core.records import Accountant
from fedloom.privacy.analysis_rules import StatKind
from fedloom.privacy.dp import epsilon as dp_epsilon

MAX_STATISTICS = 100
MAX_BINS = 10_000
MAX_VALUE = 1e15  # a bound, a bin edge: beyond any column a site holds

COLUMN_STATS = frozenset(StatKind.__args__) - {"count"}  # type: ignore[attr-defined]
SKETCHED = frozenset({"quantiles", "min", "max"})  # read from a fine histogram
MOMENTS = {"sum": 2, "mean": 2, "variance": 3}  # how many sums each needs: n, s1[, s2]
Edge = Annotated[float, Field(ge=-MAX_VALUE, le=MAX_VALUE, allow_inf_nan=False)]
Quantile = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class Statistic(Frozen):
    """One statistic of one column (``count`` counts the table's rows)."""

    stat: StatKind
    column: str | None = None
    bins: tuple[Edge, ...] | None = None  # histogram: the bin edges, increasing
    range: tuple[Edge, Edge] | None = None  # the values' bounds (clipped into it)
    q: tuple[Quantile, ...] = (0.25, 0.5, 0.75)  # quantiles: which
    resolution: Annotated[int, Field(ge=2, le=MAX_BINS, strict=True)] = 1000  # sketch bins

    @model_validator(mode="after")
    def _complete(self) -> Statistic:
        if self.stat in COLUMN_STATS and not self.column:
            raise ValueError(f"{self.stat} needs a column: name one with `column:`")
        if self.stat == "count" and self.column is not None:
            raise ValueError("count counts the table's rows: it takes no column")
        if self.stat == "histogram":
            edges = self.bins or ()
            if len(edges) < 2 or len(edges) > MAX_BINS + 1:
                raise ValueError(f"histogram needs bins: 2 to {MAX_BINS + 1} edges")
            if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
                raise ValueError(f"histogram bins must increase (got {list(edges)})")
        elif self.bins is not None:
            raise ValueError(f"bins is for a histogram, not {self.stat}")
        if self.stat in SKETCHED and self.range is None:
            raise ValueError(
                f"{self.stat} is read from a fine histogram over the values' range: give "
                "range: [low, high]"
            )
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high (got {self.range})")
        return self

    @property
    def label(self) -> str:
        """How the statistic is named in results and messages: ``mean(age)``."""
        return self.stat if self.column is None else f"{self.stat}({self.column})"

    @property
    def size(self) -> int:
        """How many sums the statistic's block holds."""
        if self.stat == "count":
            return 1
        if self.stat == "histogram":
            return len(self.bins or ()) - 1
        if self.stat in SKETCHED:
            return self.resolution
        return MOMENTS[self.stat]

    @property
    def cells(self) -> int:
        """How many cells a site may withhold in it: each bin of a histogram, else one."""
        return self.size if self.stat == "histogram" else 1

    @property
    def centre(self) -> float:
        """What the site subtracts before it sums (the middle of the range; 0 without)."""
        return 0.0 if self.range is None else (self.range[0] + self.range[1]) / 2

    def sensitivities(self) -> tuple[float, ...]:
        """How far one record can move each part of the block (L2), part by part: the
        count, the sum, the sum of squares of the centred, clipped values; a histogram
        or sketch is one part (one record moves one bin by one)."""
        if self.stat in ("count", "histogram") or self.stat in SKETCHED:
            return (1.0,)
        low, high = self.range if self.range is not None else (-math.inf, math.inf)
        half = (high - low) / 2
        return (1.0, half, half * half)[: MOMENTS[self.stat]]


class AnalysisDP(Frozen):
    """Gaussian noise on every released sum, counted as one Gaussian mechanism of
    ``noise_multiplier`` by the plan's accountant (``privacy.accountant``)."""

    noise_multiplier: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 1e-5
    epsilon_budget: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    def epsilon(self, accountant: Accountant) -> float:
        """What one release costs: one Gaussian mechanism of ``noise_multiplier``."""
        return dp_epsilon([self.noise_multiplier], self.delta, accountant)


class AnalysisPlan(Frozen):
    """The ``analysis:`` section of a plan."""

    table: str = "table.csv"  # the CSV file in each site's data folder (dataset: custom)
    min_count: Annotated[int, Field(ge=1, le=1_000_000, strict=True)] = 10
    statistics: Annotated[tuple[Statistic, ...], Field(min_length=1, max_length=MAX_STATISTICS)]
    dp: AnalysisDP | None = None

    @model_validator(mode="after")
    def _bounded_under_dp(self) -> AnalysisPlan:
        if self.dp is not None:
            unbounded = [s.label for s in self.statistics if s.stat in MOMENTS and not s.range]
            if unbounded:
                raise ValueError(
                    f"under dp, {', '.join(unbounded)} need range: [low, high]: the noise is "
                    "scaled to how far one record can move a sum"
                )
        if "/" in self.table or "\\" in self.table or self.table.startswith("."):
            raise ValueError(
                f"table must be a file name in the site's data folder ({self.table!r})"
            )
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the statistics read, in order of first use."""
        seen = dict.fromkeys(s.column for s in self.statistics if s.column is not None)
        return tuple(seen)

    def parts(self) -> int:
        """How many Gaussian mechanisms a release is made of (each part of each block)."""
        return sum(len(s.sensitivities()) for s in self.statistics)
