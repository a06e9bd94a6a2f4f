"""Upload ingestion: the reasons an update is refused or rolled back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedloom.core.errors import UpdateRejected
from fedloom.core.sanitize import MAX_TEXT_CHARS, printable


def closed_while_streaming(round: int) -> str:
    return f"round {round} closed while the update streamed"


def abort_reason(err: BaseException) -> str:
    if isinstance(err, UpdateRejected):
        return err.message
    return f"upload broke off: {type(err).__name__}: {err}"


def spec_mismatch(got: Iterable[Any], expected: Iterable[Any]) -> str:
    got_l, exp_l = list(got), list(expected)
    if len(got_l) != len(exp_l):
        return f"update has {len(got_l)} tensors, the global model {len(exp_l)}"
    for g, e in zip(got_l, exp_l, strict=True):
        if g != e:
            return (
                f"tensor '{printable(g.name, MAX_TEXT_CHARS)}' {printable(g.dtype, 40)}"
                f"{printable(list(g.shape), MAX_TEXT_CHARS)} does not match the global "
                f"model's {e.name!r} {e.dtype}{list(e.shape)}"
            )
    return "tensor specs differ from the global model"
