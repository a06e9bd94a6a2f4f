"""What a simulation is asked to do beyond its plan: its workers, where they run, an
attack to stage, the centralised baseline (the command line's options, as one value)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedloom.simulation.ray_backend import RayBackend


@dataclass(frozen=True, kw_only=True)
class SimulationOptions:
    workers: int | None = None  # None: one per core here, or per CPU of the Ray cluster
    roundtrip: bool = False
    attack: str | None = None
    attackers: int = 0
    baseline: bool = False
    backend: RayBackend | None = None  # None: worker processes on this machine
    gpus: int = 0  # pin worker i to GPU i % gpus (0: the plan's training.device)
    # the folder of the simulated sites' state folders (the run's sites/); None: a
    # temporary folder, removed after the run
    state_root: Path | None = None
    # the sites that take part (None: every site of the plan): the others keep their data
    # and are never selected. A coalition, for contribution scores
    sites: tuple[str, ...] | None = None
    # also evaluate the initial model on the test set (SimulationResult.initial_test_metrics)
    test_initial: bool = False
    # evaluate this model at every site (and on the test set), with no training round
    # (`fedloom evaluate`); it must have the task's tensors
    model: Mapping[str, np.ndarray] | None = None
