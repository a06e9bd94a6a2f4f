"""Server optimisers as pure parts, in the manner of FedJAX's: ``init(model)`` gives the
array groups the optimiser keeps between rounds, ``apply(groups, update)`` the groups
after one round's aggregated update and the step the model moves by. Neither changes
what it is given.

FedAvg moves the model by the update itself (:data:`PLAIN`); FedAvgM is FedAvg with
:func:`momentum` (Hsu et al., 2019), and FedAdam, FedYogi and FedAdagrad are FedAvg with
:func:`adaptive` and their moments (Reddi et al., 2021). The maths is in
:mod:`fedloom.strategies.aggregate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from fedloom.core.weights import Weights
from fedloom.strategies.aggregate import adaptive_step, fedavgm_step, initial_moments

Groups = dict[str, Weights]
Update = Mapping[str, np.ndarray]
"""A round's aggregated update, as the strategy read it (a dict, or a mean whose
narrow-float tensors are computed when read: read each once)."""
Moments = Callable[[Weights, Weights, Weights], tuple[Weights, Weights]]
"""``(m, v, update) -> (m', v')``: an adaptive optimiser's moments after one round."""


@dataclass(frozen=True)
class ServerOptimizer:
    """How the global model moves by a round's aggregated update."""

    groups: tuple[str, ...]  # the array groups it keeps in the strategy state
    init: Callable[[Weights], Groups]
    apply: Callable[[Mapping[str, Weights], Update], tuple[Groups, Update]]


PLAIN = ServerOptimizer((), lambda model: {}, lambda groups, update: ({}, update))
"""The model moves by the update itself (FedAvg, and the robust strategies)."""


def momentum(*, server_lr: float, coef: float) -> ServerOptimizer:
    """``m = coef * m + update``, and the model moves by ``server_lr * m``; ``m``
    (float64) starts at 0."""

    def init(model: Weights) -> Groups:
        return {"momentum": {n: np.zeros(np.shape(a), dtype=np.float64) for n, a in model.items()}}

    def apply(groups: Mapping[str, Weights], update: Update) -> tuple[Groups, Update]:
        delta = dict(update)  # each tensor read once
        m, step = fedavgm_step(groups["momentum"], delta, momentum_coef=coef, server_lr=server_lr)
        return {"momentum": m}, step

    return ServerOptimizer(("momentum",), init, apply)


def adaptive(moments: Moments, *, server_lr: float, tau: float) -> ServerOptimizer:
    """Reddi et al.'s Algorithm 2: ``moments`` move ``m`` and ``v`` (float64, from 0 and
    ``tau**2``), and the model moves by ``server_lr * m / (sqrt(v) + tau)``."""

    def init(model: Weights) -> Groups:
        m, v = initial_moments(model, tau)
        return {"m": m, "v": v}

    def apply(groups: Mapping[str, Weights], update: Update) -> tuple[Groups, Update]:
        m, v = moments(groups["m"], groups["v"], dict(update))  # each tensor read once
        return {"m": m, "v": v}, adaptive_step(m, v, server_lr, tau)

    return ServerOptimizer(("m", "v"), init, apply)
