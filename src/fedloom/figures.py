"""A run's figures by the task's declared metrics (:class:`~fedloom.tasks.base.Metrics`):
the names ``summary.json`` gives them, which site did worst, the plot's file name.

Pure functions: the runtime hands in the declaration and the metrics; nothing here
reads a file or loads a task. A classifier's declaration (``accuracy`` primary,
``loss`` lower is better) gives the names fedloom always gave: ``test_accuracy``,
``worst_site_accuracy``, ``accuracy.png``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from fedloom.tasks.base import Metrics

_PATTERN = re.compile(r"[*?\[]")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def metric_names(metrics: Metrics, *found: Iterable[str]) -> list[str]:
    """The metrics a run reports, in order: the primary, the metrics named in
    ``lower_is_better`` (a pattern such as ``"*loss"`` names none), then any other
    metric in ``found``, sorted."""
    named = [metrics.primary]
    named += [n for n in metrics.lower_is_better if not _PATTERN.search(n) and n not in named]
    others = sorted({n for names in found for n in names} - set(named))
    return named + others


def is_worse(metrics: Metrics, name: str, a: float, b: float) -> bool:
    """Whether value ``a`` of metric ``name`` is worse than ``b``."""
    return a > b if metrics.better(name) == "lower" else a < b


def worst_value(metrics: Metrics, name: str, values: Iterable[float]) -> float | None:
    """The worst of ``values`` (the highest of a lower-is-better metric); None if none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if metrics.better(name) == "lower" else min(finite)


def worst_first(metrics: Metrics, sites: Mapping[str, Mapping[str, float]], key: str) -> list[str]:
    """Site names, the worst by ``sites[site][key]`` first (the metric ``metrics.primary``
    judges); a site without a finite value counts as the worst of all."""
    lower = metrics.better(metrics.primary) == "lower"

    def rank(site: str) -> tuple[int, float, str]:
        value = sites[site].get(key)
        if value is None or not math.isfinite(value):
            return (0, 0.0, site)
        return (1, -value if lower else value, site)

    return sorted(sites, key=rank)


def plot_file(metrics: Metrics) -> str:
    """The plot's file name: ``<primary>.png`` (``accuracy.png`` for a classifier), with
    any character that is not a letter, a digit, ``_``, ``.`` or ``-`` made ``_``."""
    return f"{_UNSAFE.sub('_', metrics.primary) or 'metric'}.png"


def metrics_to_json(metrics: Metrics) -> dict[str, Any]:
    """The declaration as JSON (a simulation worker's ``init`` reply carries it)."""
    return {"primary": metrics.primary, "lower_is_better": list(metrics.lower_is_better)}


def metrics_from_json(data: Any) -> Metrics:
    """The declaration :func:`metrics_to_json` wrote; a classifier's when ``data`` is not
    one (a worker of an older fedloom sends none)."""
    if not isinstance(data, Mapping):
        return Metrics()
    primary, lower = data.get("primary"), data.get("lower_is_better")
    if not isinstance(primary, str) or not isinstance(lower, list):
        return Metrics()
    return Metrics(primary=primary, lower_is_better=tuple(str(n) for n in lower))
