"""What the plan says of a key it does not take: the section's keys, the nearest one, and
where the plan's keys are described."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from fedloom.core import validation
from fedloom.core.validation import did_you_mean
from fedloom.docpages import doc_ref
from fedloom.plan.schema import Plan

PLAN_DOCS = doc_ref("plan")


def _section_keys(path: Sequence[str]) -> list[str]:
    """The keys the plan accepts in the section at ``path`` (``[]`` for the top level
    returns the plan's own keys)."""
    model: type[BaseModel] = Plan
    for part in path:
        annotation = getattr(model.model_fields.get(part), "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_error(error: Any, prefix: tuple[str, ...] = (), strategy: str | None = None) -> str:
    """One line for one of pydantic's errors in the plan (or in the parameters of the
    strategy called ``strategy``)."""

    def unknown_key(loc: list[str]) -> str:
        where = f"strategy {strategy!r}" if strategy else "this section"
        known = [] if strategy else _section_keys(loc[:-1])
        guess = did_you_mean(loc[-1], known) if loc else ""
        return f"unknown key for {where}{guess}; check its spelling in {PLAN_DOCS}"

    return validation.describe_error(error, prefix, unknown_key)
