"""What the simulation asks its workers: a typed operation and typed fields in the JSON
header of a pipe message (:mod:`fedloom.simulation.pipes`), never pickle.

An instruction travels as a JSON object of its fields (:func:`instruction_to_json`), the
same in a worker process, a Ray actor and the in-process worker.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from fedloom.attacks import Attack, AttackKind
from fedloom.core.errors import TaskError
from fedloom.core.records import Ending, Instruction, InstructionKind, TrainSettings


class WorkerOp(enum.Enum):
    """One request to a worker."""

    INIT = "init"  # load the task: reply with its initial model and declared metrics
    CHECK = "check"  # the task's smoke check on one site's data, before round 1
    RUN = "run"  # a batch of sites' instructions, each from the same model
    TEST = "test"  # evaluate a model on the test set
    BASELINE = "baseline"  # the centralised baseline
    STOP = "stop"  # the worker process exits


def request(op: WorkerOp, **fields: Any) -> dict[str, Any]:
    """The header of a request: its operation and its fields."""
    return {"op": op.value, **fields}


def op_of(header: Mapping[str, Any]) -> WorkerOp:
    """The operation ``header`` asks for; :class:`TaskError` for one no worker knows."""
    try:
        return WorkerOp(header.get("op"))
    except ValueError:
        raise TaskError(f"unknown worker request {header.get('op')!r}") from None


def _plain(value: Any) -> Any:
    """A field's value as JSON holds it: an enum by its value, settings as an object."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, TrainSettings):  # numbers and flags only: no deep copy needed
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return list(value)
    return dict(value) if isinstance(value, Mapping) else value


def instruction_to_json(instruction: Instruction) -> dict[str, Any]:
    """Every field of ``instruction``, by its name."""
    return {f.name: _plain(getattr(instruction, f.name)) for f in dataclasses.fields(Instruction)}


def instruction_from_json(obj: Mapping[str, Any]) -> Instruction:
    """What :func:`instruction_to_json` wrote; the typed fields typed again."""
    ending = obj["ending"]
    return Instruction(
        **{
            **obj,
            "kind": InstructionKind(obj["kind"]),
            "settings": TrainSettings(**obj["settings"]),
            "exchange_steps": tuple(obj["exchange_steps"]),
            "ending": None if ending is None else Ending(ending),
        }
    )


def attack_to_json(attack: Attack | None) -> dict[str, Any] | None:
    """The simulated attack every worker gets when it starts (None: no attack)."""
    if attack is None:
        return None
    return {
        "kind": attack.kind.value,
        "factor": attack.factor,
        "attackers": sorted(attack.attackers),
    }


def attack_from_json(d: dict[str, Any] | None) -> Attack | None:
    if d is None:
        return None
    return Attack(AttackKind(d["kind"]), float(d["factor"]), frozenset(d["attackers"]))
