"""What a site releases for an analysis, as pure functions: one block of sums per
statistic, the cells it withholds, and the DP noise on them.

A statistic's block (``stat.NN.sums``) holds what the aggregator can add up across
sites: a count; a count, a sum and a sum of squares of the centred values; a histogram's
bin counts; a sketch's fine bin counts. Its withheld cells (``stat.NN.withheld``) are 1
where this site's count was above 0 but below the plan's ``min_count``: the site sends
zeros there and says so, and the aggregator reports the cell as suppressed, never as 0.
"""

from __future__ import annotations

import math

import numpy as np

from fedloom.analysis.query import MOMENTS, SKETCHED, AnalysisPlan, Statistic
from fedloom.analysis.table import Table, column
from fedloom.core.weights import Weights


def sums_name(index: int) -> str:
    return f"stat.{index:02d}.sums"


def withheld_name(index: int) -> str:
    return f"stat.{index:02d}.withheld"


def empty_release(plan: AnalysisPlan) -> Weights:
    """The release's tensors, all zero: the 'model' an analysis starts from."""
    out: Weights = {}
    for i, s in enumerate(plan.statistics):
        out[sums_name(i)] = np.zeros(s.size, np.float64)
        out[withheld_name(i)] = np.zeros(s.cells, np.float64)
    return out


def rows_of(table: Table) -> int:
    return len(next(iter(table.values()))) if table else 0


def block(table: Table, stat: Statistic, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The statistic's sums over ``table`` and the record count of each of its cells."""
    if stat.stat == "count":
        n = rows_of(table)
        return np.array([n], np.float64), np.array([n])
    assert stat.column is not None  # noqa: S101 - the schema requires it
    values = column(table, stat.column, where)
    values = values[~np.isnan(values)]
    if stat.range is not None:
        values = np.clip(values, *stat.range)
    n = len(values)
    if stat.stat == "histogram":
        counts, _ = np.histogram(values, bins=np.asarray(stat.bins, np.float64))
        return counts.astype(np.float64), counts
    if stat.stat in SKETCHED:
        return sketch(values, stat), np.array([n])
    centred = values - stat.centre
    moments = (float(n), float(np.sum(centred)), float(np.sum(centred * centred)))
    return np.array(moments[: MOMENTS[stat.stat]], np.float64), np.array([n])


def sketch(values: np.ndarray, stat: Statistic) -> np.ndarray:
    """The counts of ``stat.resolution`` equal bins over ``stat.range`` (values already
    clipped into it; the top edge falls in the last bin)."""
    assert stat.range is not None  # noqa: S101 - the schema requires it
    low, high = stat.range
    at = np.floor((values - low) / (high - low) * stat.resolution).astype(np.int64)
    at = np.clip(at, 0, stat.resolution - 1)
    return np.bincount(at, minlength=stat.resolution).astype(np.float64)


def site_release(table: Table, plan: AnalysisPlan, where: str) -> tuple[Weights, int]:
    """Every statistic's block with the cells under ``min_count`` withheld, and how
    many cells were withheld."""
    out: Weights = {}
    withheld_cells = 0
    for i, stat in enumerate(plan.statistics):
        sums, counts = block(table, stat, f"{where}, {stat.label}")
        small = (counts > 0) & (counts < plan.min_count)
        if stat.stat == "histogram":
            sums = np.where(small, 0.0, sums)
        elif small.any():
            sums = np.zeros_like(sums)
        out[sums_name(i)] = sums
        out[withheld_name(i)] = small.astype(np.float64)
        withheld_cells += int(small.sum())
    return out, withheld_cells


def noise_scales(plan: AnalysisPlan) -> list[np.ndarray]:
    """The standard deviation of the noise on each sum of each block: part ``j`` of
    sensitivity ``d_j`` gets ``z * sqrt(P) * d_j`` over the release's ``P`` parts, so
    the release is one Gaussian mechanism of multiplier ``z``."""
    assert plan.dp is not None  # noqa: S101 - asked only under dp
    scale = plan.dp.noise_multiplier * math.sqrt(plan.parts())
    out = []
    for stat in plan.statistics:
        parts = stat.sensitivities()
        if len(parts) == 1:
            out.append(np.full(stat.size, scale * parts[0]))
        else:
            out.append(scale * np.asarray(parts, np.float64))
    return out


def noised(release: Weights, plan: AnalysisPlan, rng: np.random.Generator) -> Weights:
    """``release`` with Gaussian noise on every sum (the withheld flags stay as they are)."""
    out = dict(release)
    for i, std in enumerate(noise_scales(plan)):
        out[sums_name(i)] = release[sums_name(i)] + rng.normal(0.0, std)
    return out


def largest(release: Weights) -> float:
    """The largest magnitude in ``release`` (what secure aggregation must encode)."""
    return max((float(np.max(np.abs(a))) for a in release.values() if a.size), default=0.0)
