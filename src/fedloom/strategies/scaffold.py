"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning"): with non-IID sites, each site's local steps drift towards its own
optimum; SCAFFOLD corrects every local gradient step by ``c - c_i``, the difference
between the federation's control variate ``c`` and the site's own ``c_i`` (estimates of
the mean gradient and of the site's gradient), so that local steps follow the global
direction.

How it travels: the server's ``c`` is a set of extra tensors in the global model, one per
float tensor, named ``fedloom.scaffold.<name>`` (float32, from 0). They go to the sites
with the model and come back as a part of each update (the site's ``Δc_i``), so the
aggregator's mean of the updates moves ``c`` by the sample-weighted mean of the
``Δc_i``: the paper's ``c + (1/|S|) sum Δc_i`` with every site in every round (weighted
as the model's update is). Secure aggregation and resume need nothing more. They are
never part of the model a run publishes (:func:`model_part`), and a site's task never
sees them: the site's runtime strips them, hands the task the correction
(``SiteContext.correction``) and keeps ``c_i`` in the site's state folder. After ``K``
local steps at learning rate ``lr`` from ``x`` to ``y``, the site's new variate is the
paper's option II::

    c_i+ = c_i - c + (x - y) / (K * lr)

(exact for plain SGD at a constant learning rate; with momentum, Adam or a schedule it
is an approximation). Each round sends and receives twice the model's float bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
from pydantic import Field

from fedloom.core.errors import StateError
from fedloom.core.records import Summary
from fedloom.core.state import StrategyState
from fedloom.core.weights import Weights, is_float
from fedloom.strategies.fedavg import BaseStrategy

CONTROL = "fedloom.scaffold."
"""The prefix of a control variate's name in the global model."""


def is_control(name: str) -> bool:
    return name.startswith(CONTROL)


def model_part(weights: Mapping[str, np.ndarray]) -> Weights:
    """``weights`` without SCAFFOLD's control variates: the model itself."""
    return {n: a for n, a in weights.items() if not is_control(n)}


def controls_of(weights: Mapping[str, np.ndarray]) -> Weights:
    """The control variates in ``weights``, by the name of the tensor each controls."""
    return {n[len(CONTROL) :]: a for n, a in weights.items() if is_control(n)}


def with_controls(model: Mapping[str, np.ndarray], controls: Mapping[str, np.ndarray]) -> Weights:
    """``model`` followed by ``controls`` under their names in the global model."""
    return {**model, **{CONTROL + n: a for n, a in controls.items()}}


def zero_controls(model: Mapping[str, np.ndarray]) -> Weights:
    """A float32 zero for each float tensor of ``model``."""
    return {n: np.zeros(np.shape(a), np.float32) for n, a in model.items() if is_float(a.dtype)}


def site_control(
    c_i: Mapping[str, np.ndarray],
    c: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    steps: int,
    lr: float,
) -> Weights:
    """The site's next variate, ``c_i - c + (start - trained) / (steps * lr)`` (option II
    of the paper), for each name of ``c``, computed in float64 and kept as float32."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"scaffold: local steps ({steps}) and lr ({lr}) must be positive")
    scale = 1.0 / (steps * lr)
    out: Weights = {}
    for name in c:
        x = np.asarray(start[name], np.float64)
        y = np.asarray(trained[name], np.float64)
        new = np.asarray(c_i[name], np.float64) - np.asarray(c[name], np.float64)
        out[name] = (new + (x - y) * scale).astype(np.float32)
    return out


@dataclass(frozen=True, kw_only=True)
class Scaffold(BaseStrategy):
    """SCAFFOLD (see the module): the model moves by ``server_lr`` times the mean update,
    the control variate by the mean of the sites' ``Δc_i``. Needs a task that corrects
    its gradient steps (``TorchTask``, ``HFTask``, ``SoftmaxRegression``; a task of
    your own with ``supports_scaffold = True``) and reports its local steps."""

    name: ClassVar[str] = "scaffold"
    needs_updates: ClassVar[bool] = False

    server_lr: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 1.0

    def init(self, weights: Weights) -> StrategyState:
        taken = [n for n in weights if is_control(n)]
        if taken:
            raise StateError(
                f"scaffold keeps its control variates under {CONTROL!r}, and the model "
                f"already has tensors named so: {taken[:3]}",
                hint="rename those tensors of the model",
            )
        return super().init(with_controls(weights, zero_controls(weights)))

    def _delta(
        self, round: int, state: StrategyState, summary: Summary
    ) -> Mapping[str, np.ndarray] | None:
        delta = super()._delta(round, state, summary)
        if delta is None or self.server_lr == 1.0:
            return delta
        return {
            n: (d if is_control(n) else np.asarray(d, np.float64) * self.server_lr)
            for n, d in delta.items()
        }
