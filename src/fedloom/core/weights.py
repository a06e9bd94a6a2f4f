"""Weights: an ordered ``dict[str, numpy.ndarray]`` with native dtypes kept.

bfloat16 arrives through ``ml_dtypes``; integer buffers (step counters) stay integers.
Functions here are pure: they never modify their inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from fedloom.core.errors import UpdateRejected

Weights = dict[str, np.ndarray]
"""Model weights or an update: tensor name -> array, in the model's own order."""

_EXTRA_DTYPES: dict[str, np.dtype] = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}


@functools.lru_cache(maxsize=64)  # on every chunk's hot path; a refused name is not kept
def dtype_from_name(name: str) -> np.dtype:
    """The numpy dtype called ``name`` (``float32``, ``bfloat16``, ``int64`` …)."""
    if name in _EXTRA_DTYPES:
        return _EXTRA_DTYPES[name]
    try:
        dtype = np.dtype(name)
    except TypeError as err:
        raise UpdateRejected(f"unknown dtype {name!r}") from err
    if dtype.kind not in "fiub" or dtype.hasobject:
        raise UpdateRejected(f"dtype {name!r} cannot travel: only numeric tensors do")
    return dtype


@functools.lru_cache(maxsize=64)
def dtype_name(dtype: np.dtype) -> str:
    """The wire name of ``dtype``; the inverse of :func:`dtype_from_name`."""
    return str(np.dtype(dtype).name)


def is_float(dtype: np.dtype) -> bool:
    """True for float16/32/64 and bfloat16."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == _EXTRA_DTYPES["bfloat16"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of one tensor: what a receiver checks before it accepts bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_from_name(self.dtype).itemsize

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def specs_of(weights: Mapping[str, np.ndarray]) -> tuple[TensorSpec, ...]:
    """The specs of ``weights``, in order."""
    return tuple(
        TensorSpec(name, dtype_name(a.dtype), tuple(int(d) for d in a.shape))
        for name, a in weights.items()
    )


def nbytes(weights: Mapping[str, np.ndarray]) -> int:
    """Total bytes of the tensors in ``weights``."""
    return sum(int(a.nbytes) for a in weights.values())


def subtract(local: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Weights:
    """The update ``local - base``, tensor by tensor, in each tensor's own dtype."""
    check_compatible(local, specs_of(base))
    out: Weights = {}
    for name, b in base.items():
        a = local[name]
        if b.dtype in (np.float32, np.float64) and a.dtype == b.dtype:
            # IEEE subtraction is correctly rounded: the same bits as going through
            # float64 and back, without the two whole-tensor temporaries
            out[name] = np.subtract(a, b)
        elif is_float(b.dtype):
            out[name] = (a.astype(np.float64) - b.astype(np.float64)).astype(b.dtype)
        else:
            out[name] = (a.astype(np.int64) - b.astype(np.int64)).astype(b.dtype)
    return out


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Weights:
    """``base + delta`` computed in float64 and cast back to each tensor's dtype.

    Integer tensors are rounded to the nearest integer.
    """
    out: Weights = {}
    for name, b in base.items():
        if isinstance(delta, LazyWeights) and delta.is_computed(name):
            out[name] = _apply_in_blocks(b, functools.partial(delta.block, name))
            continue
        # in blocks: the same operations element by element as on the whole tensor, so
        # the same bits, with a float64 temporary of one block
        flat_d = np.broadcast_to(np.asarray(delta[name]), b.shape).reshape(-1)
        out[name] = _apply_in_blocks(b, functools.partial(_window, flat_d))
    return out


_APPLY_BLOCK = 1 << 20  # elements: an 8 MiB float64 temporary


def _window(flat: np.ndarray, start: int, stop: int) -> np.ndarray:
    return flat[start:stop]


def _apply_in_blocks(base: np.ndarray, delta_block: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """``base + delta`` in float64, cast back, block by block (``delta_block(start, stop)``
    gives the flat delta of elements ``[start, stop)``)."""
    flat_b = base.reshape(-1)
    new = np.empty(base.size, dtype=base.dtype)
    for start in range(0, base.size, _APPLY_BLOCK):
        stop = min(base.size, start + _APPLY_BLOCK)
        part = np.array(flat_b[start:stop], dtype=np.float64)
        part += delta_block(start, stop)
        if not is_float(base.dtype):
            np.rint(part, out=part)
        new[start:stop] = part.astype(base.dtype)
    return new.reshape(base.shape)


def check_compatible(weights: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...]) -> None:
    """Raise :class:`UpdateRejected` naming the first mismatch of names, shapes or dtypes."""
    expected = [s.name for s in specs]
    got = list(weights)
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"unexpected {extra}")
        if not detail:
            detail.append("tensors in a different order")
        raise UpdateRejected("tensor names differ from the global model: " + ", ".join(detail))
    for spec in specs:
        a = weights[spec.name]
        if tuple(a.shape) != spec.shape:
            raise UpdateRejected(
                f"tensor {spec.name!r} has shape {tuple(a.shape)}, the global model {spec.shape}"
            )
        if dtype_name(a.dtype) != spec.dtype:
            raise UpdateRejected(
                f"tensor {spec.name!r} has dtype {dtype_name(a.dtype)}, "
                f"the global model {spec.dtype}"
            )


def check_finite(weights: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`UpdateRejected` if any float tensor holds NaN or Inf."""
    for name, a in weights.items():
        if not is_float(a.dtype):
            continue
        native = a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)
        finite = np.isfinite(native)
        if not finite.all():
            bad = int(np.size(a) - np.count_nonzero(finite))
            raise UpdateRejected(f"tensor {name!r} holds {bad} NaN or Inf values")


def read_only(weights: Mapping[str, np.ndarray]) -> Weights:
    """Views of ``weights`` that refuse writes (no copy)."""
    out: Weights = {}
    for name, a in weights.items():
        view = np.asarray(a).view()
        view.flags.writeable = False
        out[name] = view
    return out


def copy_weights(weights: Mapping[str, np.ndarray]) -> Weights:
    return {k: np.array(v, copy=True) for k, v in weights.items()}


def weights_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Bit-identical: same names, order, dtypes, shapes and bytes."""
    if list(a) != list(b):
        return False
    return all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


class LazyWeights(Mapping[str, np.ndarray]):
    """Named tensors of known specs, some held, the others computed each time they are
    read (and not kept): a round's mean of a large narrow-float model, whose tensors a
    strategy reads one at a time, so that the whole mean is never in memory at once.

    ``held`` maps names to arrays; ``compute_block(name, start, stop)`` makes elements
    ``[start, stop)`` of any other tensor of ``specs`` (flat), the same bits whichever
    blocks are asked for. Read a computed tensor once where you can: each read computes
    it again; :func:`apply_delta` reads it block by block, never whole."""

    def __init__(
        self,
        specs: tuple[TensorSpec, ...],
        held: Mapping[str, np.ndarray],
        compute_block: Callable[[str, int, int], np.ndarray],
    ) -> None:
        self.specs = specs
        self._held = dict(held)
        self._compute_block = compute_block
        self._specs = {s.name: s for s in specs}
        self._names = set(self._specs)

    def is_computed(self, name: str) -> bool:
        """Whether ``name`` is computed when read (not held)."""
        return name in self._names and name not in self._held

    def block(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` of tensor ``name``, flat."""
        if name in self._held:
            return self._held[name].reshape(-1)[start:stop]
        return self._compute_block(name, start, stop)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._held:
            return self._held[name]
        if name not in self._names:
            raise KeyError(name)
        spec = self._specs[name]
        return self._compute_block(name, 0, spec.size).reshape(spec.shape)

    def __iter__(self) -> Iterator[str]:
        return (s.name for s in self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def shapes_of(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, without computing a :class:`LazyWeights` tensor."""
    if isinstance(weights, LazyWeights):
        return {s.name: tuple(s.shape) for s in weights.specs}
    return {name: tuple(np.shape(a)) for name, a in weights.items()}
