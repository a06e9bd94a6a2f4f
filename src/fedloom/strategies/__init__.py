"""Aggregation strategies and the registry the plan names them by.

A strategy is a frozen dataclass of hyper-parameters implementing
:class:`~fedloom.strategies.base.Strategy`. :func:`build_strategy` makes one from the
plan's ``strategy`` name and parameters, validating them with pydantic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import pydantic

from fedloom.core.errors import PlanError
from fedloom.core.records import RoundConfig, TrainSettings
from fedloom.core.state import StrategyState
from fedloom.strategies.base import Strategy
from fedloom.strategies.fedavg import FedAvg, FedAvgM, FedProx
from fedloom.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fedloom.strategies.robust import (
    FilteredMean,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "median": Median,
    "trimmed-mean": TrimmedMean,
    "krum": Krum,
    "multi-krum": MultiKrum,
    "geometric-median": GeometricMedian,
    "filtered-mean": FilteredMean,
}
"""Every strategy the plan can name, by its ``name``."""


def parameter_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters of the strategy called ``name``, with their defaults."""
    fields = dataclasses.fields(cast(Any, STRATEGIES[name]))  # every strategy is a dataclass
    return {f.name: f.default for f in fields}


def parameters_of(strategy: Strategy) -> dict[str, Any]:
    """The hyper-parameters of ``strategy``, every one spelled out."""
    return {f.name: getattr(strategy, f.name) for f in dataclasses.fields(cast(Any, strategy))}


def build_strategy(name: str, params: Mapping[str, Any]) -> Strategy:
    """The strategy called ``name`` with hyper-parameters ``params``.

    Raises :class:`PlanError` listing every problem: an unknown name, unknown
    parameters, or values outside their allowed range.
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        known_names = ", ".join(sorted(STRATEGIES))
        raise PlanError([f"unknown strategy {name!r}; known strategies: {known_names}"])
    known = list(parameter_defaults(name))
    problems = [
        f"strategy {name!r}: unknown parameter {key!r}; "
        + (f"it takes {', '.join(known)}" if known else "it takes no parameters")
        for key in params
        if key not in known
    ]
    strategy: Strategy | None = None
    try:
        strategy = pydantic.TypeAdapter(cls).validate_python(
            {key: value for key, value in params.items() if key in known}
        )
    except pydantic.ValidationError as err:
        for error in err.errors():
            where = ".".join(str(part) for part in error["loc"])
            problems.append(
                f"strategy {name!r}: parameter {where!r}: {error['msg']} (got {error['input']!r})"
            )
    if problems or strategy is None:
        raise PlanError(problems)
    return strategy


__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "FilteredMean",
    "GeometricMedian",
    "Krum",
    "Median",
    "MultiKrum",
    "RoundConfig",
    "STRATEGIES",
    "Strategy",
    "StrategyState",
    "TrainSettings",
    "TrimmedMean",
    "build_strategy",
    "parameter_defaults",
    "parameters_of",
]


_PROTOCOL = (
    *Strategy.__annotations__,
    *(name for name, member in vars(Strategy).items() if callable(member) and name[0] != "_"),
)
"""The members of the :class:`Strategy` protocol, read from it."""


def check_strategy(strategy: object) -> None:
    """Refuse, before any site is started, an object that lacks a part of the
    :class:`Strategy` protocol (a user's own strategy handed to ``simulate``)."""
    missing = [part for part in _PROTOCOL if not hasattr(strategy, part)]
    if missing:
        raise TypeError(
            f"{type(strategy).__name__} is not a fedloom strategy: it lacks "
            f"{', '.join(missing)} (see fedloom.Strategy; subclassing a built-in strategy "
            "such as fedloom.strategies.FedAvg gives them all)"
        )
