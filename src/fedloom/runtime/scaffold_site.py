"""SCAFFOLD at a site: the site's control variate ``c_i``, kept in its state folder
between rounds, the correction its task adds to each local gradient step, and the
``Δc_i`` that goes back with its update. The maths is
:mod:`fedloom.strategies.scaffold`'s.

The file keeps the variate from before and after the site's last training round, so
that a round opened again (a second attempt, an aggregator resumed from its
checkpoint) starts from the variate that preceded it: the aggregator's ``c`` never took
the first attempt's ``Δc_i``, and neither does the site.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedloom.core.errors import TaskError
from fedloom.core.weights import Weights
from fedloom.store.checkpoint import load_weights, read_metadata, save_weights
from fedloom.strategies.scaffold import site_control

VARIATE_FILE = "scaffold.safetensors"  # in the site's state folder
_BEFORE, _AFTER = "before/", "after/"


@dataclass(frozen=True)
class SiteVariates:
    """The federation's ``c`` and this site's ``c_i`` for one round, by tensor name
    (the site's local tensors have none)."""

    c: Weights
    c_i: Weights
    path: Path
    round: int

    def correction(self) -> Weights:
        """``c - c_i``: what the task adds to each local gradient."""
        return {n: (self.c[n].astype(np.float32) - self.c_i[n]) for n in self.c}

    def step(
        self,
        start: Mapping[str, np.ndarray],
        trained: Mapping[str, np.ndarray],
        steps: int | None,
        lr: float,
    ) -> Weights:
        """Keep the site's next ``c_i`` and return ``Δc_i`` (float32), after training
        from ``start`` to ``trained`` in ``steps`` optimiser steps at ``lr``."""
        if not steps or steps < 1:
            raise TaskError(
                "scaffold updates the site's control variate from its local steps, "
                "and the task reported none",
                hint="return TrainOutput(..., local_steps=n) (TorchTask, HFTask and "
                "SoftmaxRegression do)",
            )
        after = site_control(self.c_i, self.c, start, trained, steps, lr)
        kept = {_BEFORE + n: a for n, a in self.c_i.items()}
        kept.update({_AFTER + n: a for n, a in after.items()})
        save_weights(self.path, kept, metadata={"round": str(self.round)})
        return {n: after[n] - self.c_i[n] for n in after}


def site_variates(
    controls: Mapping[str, np.ndarray],
    *,
    supported: bool,
    task_name: str,
    state_dir: Path | None,
    round: int,
    local: set[str],
) -> SiteVariates:
    """The variates for ``round`` from the global model's ``controls`` and the site's
    state folder (``c_i`` starts at 0); :class:`TaskError` where the task cannot
    correct its steps or the site has no state folder."""
    if not supported:
        raise TaskError(
            f"the plan's strategy is scaffold, which corrects every local gradient step, "
            f"and {task_name} does not",
            hint="use TorchTask, HFTask or SoftmaxRegression, or give your task "
            "supports_scaffold = True and add SiteContext.correction to its gradients",
        )
    if state_dir is None:
        raise TaskError("scaffold keeps each site's control variate in its state folder")
    path = state_dir / VARIATE_FILE
    c = {n: np.asarray(a) for n, a in controls.items() if n not in local}
    c_i = {n: np.zeros(np.shape(a), np.float32) for n, a in c.items()}
    if path.is_file():
        prefix = _BEFORE if read_metadata(path).get("round") == str(round) else _AFTER
        kept = load_weights(path)
        for name, zero in c_i.items():
            mine = kept.get(prefix + name)
            if mine is not None and mine.shape == zero.shape:
                c_i[name] = mine.astype(np.float32)
    return SiteVariates(c, c_i, path, round)
