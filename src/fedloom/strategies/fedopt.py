"""Adaptive server optimisers: FedAdam, FedYogi and FedAdagrad.

From Reddi et al., 2021, "Adaptive Federated Optimization" (Algorithm 2). Each round's
mean update ``d`` feeds the moments ``m`` and ``v`` (float64, kept in
``state.arrays["m"]`` and ``state.arrays["v"]``), and the model moves by
``server_lr * m / (sqrt(v) + tau)``. As in the paper, ``m`` starts at 0, ``v`` at
``tau**2`` and there is no bias correction.

Defaults: ``beta1 = 0.9``, ``beta2 = 0.99`` and ``tau = 1e-3`` follow Reddi et al.'s
experimental setup. Because ``v`` starts small, each early round moves a coordinate by roughly
``server_lr`` whatever the scale of the update, so ``server_lr`` is the step size in
weight units: 0.01 for FedAdam and FedYogi. FedAdagrad's ``v`` only grows, shrinking
its steps every round, so it starts larger, at 0.1. Tune ``server_lr`` per task first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import Field

from fedloom.records import Failure, Summary
from fedloom.strategies.aggregate import (
    adagrad_moments,
    adam_moments,
    adaptive_step,
    initial_moments,
    yogi_moments,
)
from fedloom.strategies.fedavg import mean_delta_of, next_step, state_group
from fedloom.strategies.state import StrategyState
from fedloom.weights import Weights, apply_delta, copy_weights

LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
Tau = Annotated[float, Field(gt=0, allow_inf_nan=False)]

Moments = Callable[[Weights, Weights, Weights], tuple[Weights, Weights]]
"""``(m, v, delta) -> (m', v')`` with the strategy's betas bound."""


def _init(weights: Weights, tau: float) -> StrategyState:
    m, v = initial_moments(weights, tau)
    return StrategyState(
        weights=copy_weights(weights), arrays={"m": m, "v": v}, scalars={"step": 0}
    )


def _aggregate(
    name: str,
    round: int,
    state: StrategyState,
    summary: Summary,
    moments: Moments,
    server_lr: float,
    tau: float,
) -> tuple[StrategyState, Weights]:
    delta = mean_delta_of(name, round, state, summary)
    if delta is None:
        return state, state.weights
    m, v = moments(state_group(name, state, "m"), state_group(name, state, "v"), delta)
    weights = apply_delta(state.weights, adaptive_step(m, v, server_lr, tau))
    arrays = {**state.arrays, "m": m, "v": v}
    return state.evolve(weights=weights, arrays=arrays, scalars=next_step(state)), weights


@dataclass(frozen=True, kw_only=True)
class FedAdam:
    """Server-side Adam: ``v = beta2 * v + (1 - beta2) * d**2``."""

    name: ClassVar[str] = "fedadam"
    needs_updates: ClassVar[bool] = False

    server_lr: LearningRate = 0.01
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    tau: Tau = 1e-3

    def init(self, weights: Weights) -> StrategyState:
        return _init(weights, self.tau)

    def configure(self, round: int, state: StrategyState) -> Mapping[str, Any]:
        return {}

    def aggregate(
        self, round: int, state: StrategyState, summary: Summary, failures: Sequence[Failure]
    ) -> tuple[StrategyState, Weights]:
        def moments(m: Weights, v: Weights, d: Weights) -> tuple[Weights, Weights]:
            return adam_moments(m, v, d, beta1=self.beta1, beta2=self.beta2)

        return _aggregate(self.name, round, state, summary, moments, self.server_lr, self.tau)


@dataclass(frozen=True, kw_only=True)
class FedYogi:
    """Server-side Yogi: ``v = v - (1 - beta2) * d**2 * sign(v - d**2)``."""

    name: ClassVar[str] = "fedyogi"
    needs_updates: ClassVar[bool] = False

    server_lr: LearningRate = 0.01
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    tau: Tau = 1e-3

    def init(self, weights: Weights) -> StrategyState:
        return _init(weights, self.tau)

    def configure(self, round: int, state: StrategyState) -> Mapping[str, Any]:
        return {}

    def aggregate(
        self, round: int, state: StrategyState, summary: Summary, failures: Sequence[Failure]
    ) -> tuple[StrategyState, Weights]:
        def moments(m: Weights, v: Weights, d: Weights) -> tuple[Weights, Weights]:
            return yogi_moments(m, v, d, beta1=self.beta1, beta2=self.beta2)

        return _aggregate(self.name, round, state, summary, moments, self.server_lr, self.tau)


@dataclass(frozen=True, kw_only=True)
class FedAdagrad:
    """Server-side Adagrad: ``v = v + d**2``. Has no ``beta2``: nothing would read it."""

    name: ClassVar[str] = "fedadagrad"
    needs_updates: ClassVar[bool] = False

    server_lr: LearningRate = 0.1
    beta1: Beta = 0.9
    tau: Tau = 1e-3

    def init(self, weights: Weights) -> StrategyState:
        return _init(weights, self.tau)

    def configure(self, round: int, state: StrategyState) -> Mapping[str, Any]:
        return {}

    def aggregate(
        self, round: int, state: StrategyState, summary: Summary, failures: Sequence[Failure]
    ) -> tuple[StrategyState, Weights]:
        def moments(m: Weights, v: Weights, d: Weights) -> tuple[Weights, Weights]:
            return adagrad_moments(m, v, d, beta1=self.beta1)

        return _aggregate(self.name, round, state, summary, moments, self.server_lr, self.tau)
