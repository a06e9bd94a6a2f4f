"""FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization"): sites that take more local steps (more data,
more epochs) pull plain FedAvg towards their own optimum; FedNova averages each site's
update *per local step* and moves the model by that average times the sites' mean
number of steps.

With site ``i``'s update ``d_i``, its ``tau_i`` optimiser steps and share
``p_i = n_i / sum n`` of the samples::

    new = old + tau_eff * sum_i p_i * d_i / tau_i,      tau_eff = sum_i p_i * tau_i

(the normalisation for plain local SGD, whose accumulated gradient vector has
``||a_i||_1 = tau_i``). With equal steps at every site it is FedAvg. Each site reports
``tau_i`` in a typed field of its answer (``TrainOutput.local_steps`` on the wire as
``UpdateHeader.local_steps``): ``TorchTask``, ``HFTask`` and ``SoftmaxRegression``
report it; a task of your own returns it in its ``TrainOutput``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedloom.core.errors import AggregationError
from fedloom.core.records import Summary, UpdateSet
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights
from fedloom.strategies.fedavg import BaseStrategy
from fedloom.strategies.robust import updates_of


def fednova_delta(
    deltas: Sequence[Weights], samples: Sequence[int], steps: Sequence[int]
) -> Weights:
    """``tau_eff * sum_i p_i * deltas[i] / steps[i]`` in float64, tensor by tensor, the
    updates taken in the order given."""
    if not deltas or not (len(deltas) == len(samples) == len(steps)):
        raise AggregationError("fednova: one sample count and one step count per update")
    if min(samples) <= 0 or min(steps) <= 0:
        raise AggregationError("fednova: sample and step counts must be positive")
    total = float(sum(samples))
    shares = [n / total for n in samples]
    tau_eff = sum(p * t for p, t in zip(shares, steps, strict=True))
    out: Weights = {}
    for name in deltas[0]:
        acc = np.zeros(np.shape(deltas[0][name]), dtype=np.float64)
        for delta, p, t in zip(deltas, shares, steps, strict=True):
            acc += (p / t) * np.asarray(delta[name], dtype=np.float64)
        acc *= tau_eff
        out[name] = acc
    return out


@dataclass(frozen=True, kw_only=True)
class FedNova(BaseStrategy):
    """FedNova: FedAvg with each site's update normalised by its local steps (see the
    module). Buffers every update (as robust strategies do), so not with secure
    aggregation; a site whose task reports no step count fails the round's
    aggregation with a message naming it."""

    name: ClassVar[str] = "fednova"
    needs_updates: ClassVar[bool] = True

    def _delta(self, round: int, state: StrategyState, summary: Summary) -> Weights | None:
        updates = updates_of(self.name, round, state, summary)
        if not updates:
            return None
        assert isinstance(summary, UpdateSet)  # noqa: S101 - updates_of checked it
        steps = {r.site: r.local_steps for r in summary.results}
        missing = sorted(u.site for u in updates if steps.get(u.site, 0) <= 0)
        if missing:
            raise AggregationError(
                f"fednova normalises each update by the site's local steps, but "
                f"{', '.join(missing)} reported none",
                hint="the site's task must return TrainOutput(..., local_steps=n) "
                "(TorchTask, HFTask and SoftmaxRegression do; a TorchLoop does not)",
            )
        return fednova_delta(
            [u.delta for u in updates],
            [u.num_samples for u in updates],
            [steps[u.site] for u in updates],
        )
