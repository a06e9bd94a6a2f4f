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

import functools
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

from fedloom.strategies.aggregate import adagrad_moments, adam_moments, yogi_moments
from fedloom.strategies.fedavg import BaseStrategy
from fedloom.strategies.optimizers import ServerOptimizer, adaptive

LearningRate = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
Tau = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]


@dataclass(frozen=True, kw_only=True)
class FedAdam(BaseStrategy):
    """FedAvg with server-side Adam: ``v = beta2 * v + (1 - beta2) * d**2``."""

    name: ClassVar[str] = "fedadam"
    needs_updates: ClassVar[bool] = False

    server_lr: LearningRate = 0.01
    beta1: Beta = 0.9
    beta2: Beta = 0.99
    tau: Tau = 1e-3

    def optimizer(self) -> ServerOptimizer:
        moments = functools.partial(adam_moments, beta1=self.beta1, beta2=self.beta2)
        return adaptive(moments, server_lr=self.server_lr, tau=self.tau)


@dataclass(frozen=True, kw_only=True)
class FedYogi(FedAdam):
    """FedAdam's parameters with Yogi's second moment:
    ``v = v - (1 - beta2) * d**2 * sign(v - d**2)``."""

    name: ClassVar[str] = "fedyogi"

    def optimizer(self) -> ServerOptimizer:
        moments = functools.partial(yogi_moments, beta1=self.beta1, beta2=self.beta2)
        return adaptive(moments, server_lr=self.server_lr, tau=self.tau)


@dataclass(frozen=True, kw_only=True)
class FedAdagrad(BaseStrategy):
    """FedAvg with server-side Adagrad: ``v = v + d**2``. Has no ``beta2``: nothing would
    read it."""

    name: ClassVar[str] = "fedadagrad"
    needs_updates: ClassVar[bool] = False

    server_lr: LearningRate = 0.1
    beta1: Beta = 0.9
    tau: Tau = 1e-3

    def optimizer(self) -> ServerOptimizer:
        moments = functools.partial(adagrad_moments, beta1=self.beta1)
        return adaptive(moments, server_lr=self.server_lr, tau=self.tau)
