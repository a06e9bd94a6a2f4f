"""A model given by file, for ``fedloom evaluate --model`` and the plan's
``model.initial``: a safetensors file of weights, a run folder (its
``final.safetensors``) or an aggregator checkpoint (``round-NNNN.safetensors``, whose
global model is read); checked against the task's
own model before anything is sent."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.core.errors import TaskError, WorkspaceError
from fedloom.core.weights import Weights, specs_of
from fedloom.store.checkpoint import is_state_file, load_federation_state, load_weights
from fedloom.strategies.scaffold import model_part


def model_file(path: Path) -> Path:
    """The file of the model at ``path``: itself, or a run folder's final model."""
    if path.is_dir():
        if not (path / "final.safetensors").is_file():
            raise WorkspaceError(
                f"{path} holds no final.safetensors",
                hint="name a safetensors file, or a run folder of a run that completed",
            )
        path = path / "final.safetensors"
    if not path.is_file():
        raise WorkspaceError(f"no model file at {path}")
    return path


def load_model(path: Path) -> Weights:
    """The model at ``path`` (a file, or a run folder holding ``final.safetensors``)."""
    path = model_file(path)
    if is_state_file(path):  # an aggregator's checkpoint: its global model
        weights = load_federation_state(path).strategy.weights
    else:
        weights = load_weights(path)
    return model_part(weights)  # without what SCAFFOLD keeps inside the model


def model_problems(
    expected: Mapping[str, np.ndarray], given: Mapping[str, np.ndarray]
) -> list[str]:
    """How ``given`` differs from the task's model ``expected``: missing or extra
    tensors, other shapes or dtypes (at most 5 named); empty if it fits."""
    want = {s.name: s for s in specs_of(expected)}
    got = {s.name: s for s in specs_of(given)}
    problems = [f"tensor {n!r} is missing" for n in want if n not in got]
    problems += [f"tensor {n!r} is not the task's" for n in got if n not in want]
    for name in want.keys() & got.keys():
        a, b = want[name], got[name]
        if (a.shape, a.dtype) != (b.shape, b.dtype):
            problems.append(
                f"tensor {name!r} is {b.dtype}{list(b.shape)}, the task's {a.dtype}{list(a.shape)}"
            )
    return problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])


def given_model(
    expected: Mapping[str, np.ndarray],
    given: Mapping[str, np.ndarray],
    what: str = "the model to evaluate",
) -> Weights:
    """``given``, in the task's tensor order, once it fits the task's model ``expected``."""
    problems = model_problems(expected, given)
    if problems:
        raise TaskError(
            f"{what} is not this task's model: " + "; ".join(problems),
            hint="give a model trained with this workspace's task (a run's final.safetensors)",
        )
    return {name: np.asarray(given[name]) for name in expected}


def plan_initial(initial: Weights, plan: Any, root: Path) -> Weights:
    """The model a run starts from: the plan's ``model.initial`` (resolved against the
    workspace ``root``) checked against the task's ``initial``, else ``initial``."""
    path = plan.initial_model_path(root)
    if path is None:
        return initial
    return given_model(initial, load_model(path), f"the plan's model.initial {path}")
