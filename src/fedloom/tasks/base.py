"""The task interface: the user's code that builds the model, trains and evaluates.

A workspace's task module defines one object named ``task`` that satisfies
:class:`Task`. Most users never implement it by hand: :class:`~fedloom.tasks.TorchTask`
takes a model and a loss, :class:`~fedloom.tasks.NumpyTask` takes three plain
functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from fedloom.records import DPSGDSettings, EvalOutput, TrainOutput, TrainSettings
from fedloom.weights import Weights


@dataclass(frozen=True)
class SiteData:
    """One site's local data: a training split and a validation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_val(self) -> int:
        return len(self.y_val)


@dataclass(frozen=True)
class SiteContext:
    """Who and when: the site, the round, and the keyed seed for its randomness."""

    site: str
    index: int
    round: int
    seed: int  # already keyed by (plan seed, round, site, "train")
    data_path: Path | None = None
    options: Mapping[str, object] = field(default_factory=dict)
    # sample-level DP-SGD asked by the plan (privacy.dp_sgd); None: plain training
    dp_sgd: DPSGDSettings | None = None
    # training rounds this site has been selected for so far, this one included (an upper
    # bound on the rounds it trained: what DP-SGD's accountant composes)
    rounds_selected: int = 1


@runtime_checkable
class Task(Protocol):
    def init_weights(self, seed: int) -> Weights:
        """The initial global model (called once, at the aggregator)."""
        ...

    def train(
        self, weights: Weights, data: SiteData, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        """Train from ``weights`` on ``data``; return the local weights (not a delta)."""
        ...

    def evaluate(self, weights: Weights, x: np.ndarray, y: np.ndarray) -> EvalOutput:
        """Metrics of ``weights`` on ``(x, y)``; ``accuracy`` and ``loss`` by convention."""
        ...
