"""The aggregator's side of an analysis, as pure functions: the sites' summed blocks
become the statistics, and a cell any site withheld is reported as suppressed.

The round's aggregate is the mean of the sites' blocks, each site of weight 1, so the
totals are that mean times the number of sites that answered. Without noise a count is
a whole number again (rounded: the mean of integers, multiplied back, is off by a float
rounding at most).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.analysis.query import SKETCHED, AnalysisPlan, Statistic
from fedloom.analysis.sums import noise_scales, sums_name, withheld_name

NON_EMPTY_DEVIATIONS = 3.0  # under dp, a sketch bin counts as seen above 3 noise deviations


def totals(mean: Mapping[str, np.ndarray], sites: int) -> dict[str, np.ndarray]:
    """The sites' sums from the mean of their blocks."""
    return {k: np.asarray(v, np.float64) * sites for k, v in mean.items()}


def suppressed_note(sites: int, min_count: int) -> str:
    return f"suppressed: fewer than {min_count} records at {sites} site(s)"


def analysis_results(
    plan: AnalysisPlan, summed: Mapping[str, np.ndarray], sites: int, epsilon: float | None
) -> dict[str, Any]:
    """Every statistic of ``plan`` from the sites' summed blocks (``summed``), as JSON
    data; ``epsilon`` is what the release cost under dp (None without)."""
    noisy = plan.dp is not None
    scales = noise_scales(plan) if noisy else None
    rows = []
    for i, stat in enumerate(plan.statistics):
        sums = np.asarray(summed[sums_name(i)], np.float64)
        withheld = np.rint(np.asarray(summed[withheld_name(i)], np.float64)).astype(np.int64)
        if not noisy:  # the counts are whole numbers again
            whole = stat.stat in ("count", "histogram") or stat.stat in SKETCHED
            sums = np.rint(sums) if whole else np.concatenate([np.rint(sums[:1]), sums[1:]])
        deviation = 0.0 if scales is None else float(scales[i][0]) * math.sqrt(sites)
        row: dict[str, Any] = {"statistic": stat.label, "stat": stat.stat, "column": stat.column}
        row.update(_figures(stat, sums, withheld, plan.min_count, deviation))
        rows.append(row)
    out: dict[str, Any] = {"sites": sites, "min_count": plan.min_count, "statistics": rows}
    if plan.dp is not None:
        out["dp"] = {
            "noise_multiplier": plan.dp.noise_multiplier,
            "delta": plan.dp.delta,
            "epsilon": epsilon,
        }
    return out


def _figures(
    stat: Statistic, sums: np.ndarray, withheld: np.ndarray, min_count: int, deviation: float
) -> dict[str, Any]:
    if stat.stat == "histogram":
        counts: list[float | None] = []
        notes: list[str | None] = []
        for value, by in zip(sums.tolist(), withheld.tolist(), strict=True):
            counts.append(None if by else _count(value))
            notes.append(suppressed_note(by, min_count) if by else None)
        return {"edges": list(stat.bins or ()), "counts": counts, "suppressed": notes}
    if withheld[0]:
        return {"value": None, "suppressed": suppressed_note(int(withheld[0]), min_count)}
    if stat.stat in SKETCHED:
        return _sketched(stat, sums, deviation)
    n = float(sums[0])
    if stat.stat == "count":
        return {"value": _count(n)}
    out: dict[str, Any] = {"n": _count(n)}
    if stat.stat == "sum":
        out["value"] = stat.centre * n + float(sums[1])
    elif stat.stat == "mean":
        out["value"] = stat.centre + float(sums[1]) / n if n > 0 else None
    else:  # variance of the (shift-free) centred values, with n - 1
        out["value"] = float(sums[2] - sums[1] ** 2 / n) / (n - 1) if n > 1 else None
    return out


def _count(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _sketched(stat: Statistic, counts: np.ndarray, deviation: float) -> dict[str, Any]:
    """Quantiles, min or max from the summed sketch: linear within a bin; min and max
    are the outer edges of the lowest and highest bins seen (above the noise)."""
    assert stat.range is not None  # noqa: S101 - the schema requires it
    low, high = stat.range
    width = (high - low) / stat.resolution
    seen = np.flatnonzero(counts > max(0.5, NON_EMPTY_DEVIATIONS * deviation))
    out: dict[str, Any] = {"resolution": width}
    if not len(seen):
        return {**out, "value": None, "note": "no values seen"}
    if stat.stat == "min":
        edge = (
            {"note": "at the range's low end: values below it count there"} if not seen[0] else {}
        )
        return {**out, "value": low + width * int(seen[0]), **edge}
    if stat.stat == "max":
        top = seen[-1] == stat.resolution - 1
        edge = {"note": "at the range's high end: values above it count there"} if top else {}
        return {**out, "value": low + width * (int(seen[-1]) + 1), **edge}
    clipped = np.clip(counts, 0.0, None)
    cumulative = np.cumsum(clipped)
    total = float(cumulative[-1])
    values = []
    for q in stat.q:
        target = q * total
        at = int(np.searchsorted(cumulative, target, side="left"))
        before = float(cumulative[at - 1]) if at else 0.0
        inside = float(clipped[at]) or 1.0
        values.append(low + width * (at + (target - before) / inside))
    return {**out, "q": list(stat.q), "value": values}
