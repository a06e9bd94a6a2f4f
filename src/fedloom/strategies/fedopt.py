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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import Field

from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights, copy_weights
from fedloom.strategies.aggregate import (
    adagrad_moments,
    adam_moments,
    adaptive_step,
    initial_moments,
    yogi_moments,
)
from fedloom.strategies.fedavg import MeanStrategy, moved, state_group

LearningRate = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
Tau = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]


@dataclass(frozen=True, kw_only=True)
class _AdaptiveStrategy(MeanStrategy):
    """Reddi et al.'s Algorithm 2; a subclass only says how :meth:`_moments` update."""

    if TYPE_CHECKING:  # fields of every subclass, declared there to keep their order
        server_lr: float
        tau: float

    def init(self, weights: Weights) -> StrategyState:
        m, v = initial_moments(weights, self.tau)
        return StrategyState(
            weights=copy_weights(weights), arrays={"m": m, "v": v}, scalars={"step": 0}
        )

    def _moments(self, m: Weights, v: Weights, delta: Weights) -> tuple[Weights, Weights]:
        """``(m', v')`` after the round's mean update ``delta``."""
        raise NotImplementedError

    def _advance(self, state: StrategyState, delta: Weights) -> tuple[StrategyState, Weights]:
        m, v = self._moments(
            state_group(self.name, state, "m"), state_group(self.name, state, "v"), delta
        )
        return moved(state, adaptive_step(m, v, self.server_lr, self.tau), m=m, v=v)


@dataclass(frozen=True, kw_only=True)
class _DecayingStrategy(_AdaptiveStrategy):
    """FedAdam's and FedYogi's hyper-parameters: ``v`` moves towards ``d**2`` at ``beta2``."""

    server_lr: LearningRate = 0.01
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    tau: Tau = 1e-3


@dataclass(frozen=True, kw_only=True)
class FedAdam(_DecayingStrategy):
    """Server-side Adam: ``v = beta2 * v + (1 - beta2) * d**2``."""

    name: ClassVar[str] = "fedadam"
    needs_updates: ClassVar[bool] = False

    def _moments(self, m: Weights, v: Weights, delta: Weights) -> tuple[Weights, Weights]:
        return adam_moments(m, v, delta, beta1=self.beta1, beta2=self.beta2)


@dataclass(frozen=True, kw_only=True)
class FedYogi(_DecayingStrategy):
    """Server-side Yogi: ``v = v - (1 - beta2) * d**2 * sign(v - d**2)``."""

    name: ClassVar[str] = "fedyogi"
    needs_updates: ClassVar[bool] = False

    def _moments(self, m: Weights, v: Weights, delta: Weights) -> tuple[Weights, Weights]:
        return yogi_moments(m, v, delta, beta1=self.beta1, beta2=self.beta2)


@dataclass(frozen=True, kw_only=True)
class FedAdagrad(_AdaptiveStrategy):
    """Server-side Adagrad: ``v = v + d**2``. Has no ``beta2``: nothing would read it."""

    name: ClassVar[str] = "fedadagrad"
    needs_updates: ClassVar[bool] = False

    server_lr: LearningRate = 0.1
    beta1: Beta = 0.9
    tau: Tau = 1e-3

    def _moments(self, m: Weights, v: Weights, delta: Weights) -> tuple[Weights, Weights]:
        return adagrad_moments(m, v, delta, beta1=self.beta1)
