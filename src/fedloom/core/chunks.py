"""The one check of a tensor stream's order, for every reader of chunks (the upload's
accumulator, a download's assembly): each tensor's bytes arrive once, in order, and
whole."""

from __future__ import annotations

from collections.abc import Sequence

from fedloom.core.weights import TensorSpec


def chunk_problem(
    specs: Sequence[TensorSpec], received: Sequence[int], tensor: int, offset: int, size: int
) -> str | None:
    """Why ``size`` bytes at ``offset`` of tensor number ``tensor`` do not continue the
    stream, whose tensors have ``received`` bytes so far; None when they do."""
    if not 0 <= tensor < len(specs):
        return f"chunk for tensor #{tensor}, but only {len(specs)} exist"
    spec = specs[tensor]
    if offset != received[tensor]:
        return f"tensor {spec.name!r}: chunk at byte {offset}, expected {received[tensor]}"
    if offset + size > spec.nbytes:
        return f"tensor {spec.name!r} is larger than announced ({spec.nbytes} bytes)"
    return None


def missing_problem(specs: Sequence[TensorSpec], received: Sequence[int]) -> str | None:
    """Why a stream that ended with ``received`` bytes of each tensor is incomplete; None
    when every tensor arrived whole."""
    for spec, got in zip(specs, received, strict=True):
        if got != spec.nbytes:
            return f"stream ended early: tensor {spec.name!r} has {got} of {spec.nbytes} bytes"
    return None
