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
from fedloom.core.validation import describe_error, did_you_mean
from fedloom.strategies.base import Strategy
from fedloom.strategies.fedavg import FedAvg, FedAvgM, FedProx
from fedloom.strategies.fednova import FedNova
from fedloom.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fedloom.strategies.robust import (
    FilteredMean,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)
from fedloom.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fednova": FedNova,
    "scaffold": Scaffold,
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


def strategy_problems(name: str, params: Mapping[str, Any]) -> tuple[list[str], Strategy | None]:
    """Every problem with the strategy called ``name`` and its ``params`` (an unknown
    name, unknown parameters, values outside their range), one line each naming the
    plan's ``strategy.KEY``, and the strategy when there is none. The one validator of
    strategy parameters: the plan's and :func:`build_strategy`'s."""
    cls = STRATEGIES.get(name)
    if cls is None:
        return [
            f"strategy.name: unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"
        ], None
    known = list(parameter_defaults(name))
    takes = ", ".join(known) if known else "no parameters"
    problems = [
        f"strategy.{key}: strategy {name!r} has no parameter {key!r}{did_you_mean(key, known)}; "
        f"it takes {takes}"
        for key in params
        if key not in known
    ]
    try:
        built = pydantic.TypeAdapter(cls).validate_python(
            {key: value for key, value in params.items() if key in known}
        )
    except pydantic.ValidationError as err:
        return problems + [describe_error(e, ("strategy",)) for e in err.errors()], None
    return problems, (None if problems else built)


def build_strategy(name: str, params: Mapping[str, Any]) -> Strategy:
    """The strategy called ``name`` with hyper-parameters ``params``; a
    :class:`PlanError` lists every problem (:func:`strategy_problems`)."""
    problems, strategy = strategy_problems(name, params)
    if strategy is None:
        raise PlanError(problems)
    return strategy


__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedNova",
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
    "Scaffold",
    "STRATEGIES",
    "Strategy",
    "StrategyState",
    "TrainSettings",
    "TrimmedMean",
    "build_strategy",
    "parameter_defaults",
    "parameters_of",
    "strategy_problems",
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
