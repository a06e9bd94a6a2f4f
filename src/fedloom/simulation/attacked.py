"""An attacking site's task in a simulation (``--attack``): the user's task wrapped, so
the site executor knows nothing of attacks. Under label-flip the wrapped task trains on
flipped labels; under the other attacks the update the site sends is poisoned
(:meth:`AttackedTask.sent`). Every other part of the task is the user's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedloom.attacks import Attack, AttackKind, flip_labels, poison_update
from fedloom.core.errors import TaskError
from fedloom.core.records import EvalOutput, SiteAnswer, TrainOutput, TrainSettings
from fedloom.core.rng import generator
from fedloom.core.weights import Weights
from fedloom.tasks.base import SiteContext, SiteData, Task


class AttackedTask:
    """``task`` as an attacking site runs it."""

    def __init__(self, task: Task, attack: Attack, *, num_classes: int, plan_seed: int) -> None:
        self.task = task
        self.attack = attack
        self.num_classes = num_classes
        self.plan_seed = plan_seed

    def __getattr__(self, name: str) -> Any:
        """The task's other parts (how it loads data, whether it supports DP-SGD …)."""
        return getattr(self.task, name)

    def init_weights(self, seed: int) -> Weights:
        return self.task.init_weights(seed)

    def train(
        self, weights: Weights, data: Any, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        if self.attack.kind is AttackKind.LABEL_FLIP:
            data = self._flipped(data)
        return self.task.train(weights, data, settings, context)

    def evaluate(self, weights: Weights, data: Any, context: SiteContext) -> EvalOutput:
        return self.task.evaluate(weights, data, context)

    def sent(self, answer: SiteAnswer, site: str, round: int) -> SiteAnswer:
        """What the site sends instead of its honest ``answer``: its update poisoned."""
        if answer.delta is None:
            return answer
        rng = generator(self.plan_seed, round, site, "attack")
        return dataclasses.replace(answer, delta=poison_update(answer.delta, self.attack, rng))

    def _flipped(self, data: Any) -> SiteData:
        if not isinstance(data, SiteData):
            raise TaskError("--attack label-flip needs a site's data as arrays (SiteData)")
        if not np.issubdtype(data.y_train.dtype, np.integer):
            raise TaskError("--attack label-flip needs class labels, not a regression's targets")
        flipped = flip_labels(data.y_train, self.num_classes)
        return SiteData(data.x_train, flipped, data.x_val, data.y_val)
