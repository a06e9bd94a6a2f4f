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


def instruction_to_json(instruction: Instruction) -> dict[str, Any]:
    return {
        "round": instruction.round,
        "kind": instruction.kind.value,
        "settings": dataclasses.asdict(instruction.settings),
        "config": dict(instruction.config),
        "exchange_steps": list(instruction.exchange_steps),
        "attempt_id": instruction.attempt_id,
        "privacy": dict(instruction.privacy),
        "ending": None if instruction.ending is None else instruction.ending.value,
    }


def instruction_from_json(obj: Mapping[str, Any]) -> Instruction:
    ending = obj["ending"]
    return Instruction(
        round=int(obj["round"]),
        kind=InstructionKind(obj["kind"]),
        settings=TrainSettings(**obj["settings"]),
        config=dict(obj["config"]),
        exchange_steps=tuple(obj["exchange_steps"]),
        attempt_id=str(obj["attempt_id"]),
        privacy=dict(obj["privacy"]),
        ending=None if ending is None else Ending(ending),
    )
