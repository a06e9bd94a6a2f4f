"""One way to say what is wrong with a value pydantic refused: its path, what it must be
and what was given (``training.lr: must be > 0 (got -1)``), never pydantic's own text. The
plan and a site's policy both speak this way.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

HINTS = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be text",
    "missing": "is required",
    "dict_type": "must be a section of key: value lines",
    "model_type": "must be a section of key: value lines",
    "model_attributes_type": "must be a section of key: value lines",
    "list_type": "must be a list",
    "finite_number": "must be a finite number",
}


def did_you_mean(key: str, known: Sequence[str]) -> str:
    """`` (did you mean `rounds`?)`` for the known key nearest to ``key``, or ``""``."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number of thousands of digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_path(error: Any, prefix: Sequence[str] = ()) -> list[str]:
    """The keys leading to the refused value, without pydantic's own steps."""
    loc = [str(p) for p in (*prefix, *error["loc"]) if not str(p).startswith("function-")]
    # unions report each branch (int, list[str]); keep the path readable
    return [p for p in loc if p not in {"int", "list[str]", "constrained-int"}]


def describe_error(
    error: Any,
    prefix: Sequence[str] = (),
    unknown_key: Callable[[list[str]], str] | None = None,
) -> str:
    """One line for one of pydantic's errors; ``unknown_key`` says what to tell of a key the
    schema does not take (given the key's path), else pydantic's message is used."""
    loc = error_path(error, prefix)
    path = ".".join(loc) or "(top level)"
    kind = error["type"]
    ctx = {
        k: (f"{v:g}" if isinstance(v, float) else v) for k, v in (error.get("ctx") or {}).items()
    }
    got = error.get("input")
    if kind == "extra_forbidden" and unknown_key is not None:
        return f"{path}: {unknown_key(loc)}"
    if kind in ("literal_error", "enum"):
        return f"{path}: must be one of {ctx.get('expected')} (got {shown(got)})"
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        return message if not loc else f"{path}: {message}"
    text = HINTS.get(kind, error["msg"]).format(**ctx) if kind in HINTS else error["msg"]
    given = "" if kind == "missing" else f" (got {shown(got)})"
    return f"{path}: {text}{given}"
