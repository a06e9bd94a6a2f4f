"""The codecs, as pure functions over weights.

An encoded update is still :data:`~fedloom.core.weights.Weights`: tensor names to numpy
arrays, so it travels through every transport (in process, the wire format, gRPC in
chunks) and the audit log as any update does. Each tensor of the model becomes one or
more *parts*, named after it:

========  =====================================================================
codec     the parts of a float tensor ``w`` (other tensors travel as they are)
========  =====================================================================
none      ``w``, unchanged
float16   ``w`` cast to float16 (float32 and float64 tensors; narrower ones as they are)
bfloat16  ``w`` cast to bfloat16 (likewise)
int8      ``w`` int8, same shape; ``w@scale`` float32, one per block of 1,024 values
topk      ``w@idx`` uint32 (uint64 past 2**32 values), ascending; ``w@val`` the values
zstd      ``w@zstd`` uint8: the tensor's bytes, byte-shuffled, in one zstd frame (every
          tensor, integer ones too)
========  =====================================================================

:func:`parts_of` says which parts a model tensor has under a codec, so a receiver checks
what an update announces (:func:`check_encoded`) before it takes a byte, and decodes it
back to the model's dtype and shape (:func:`decode_tensor`), refusing anything that is
not a valid encoding (:class:`~fedloom.core.errors.UpdateRejected`, with the reason).

int8 rounds stochastically, ``q = floor(x / step + u)`` with ``u`` uniform in [0, 1), so
``E[decode(encode(x))] = x`` and every value is off by less than its block's step
(``max |x| / 127``). The step is a float32 rounded up, so ``|x / step| <= 127`` and no
value is ever clipped. topk keeps the ``ceil(fraction * size)`` values of largest
magnitude; what it drops is the site's to carry (:mod:`~fedloom.compression.feedback`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from fedloom.compression.zstd_frames import ZSTD_LEVEL, zstd_bound, zstd_decode, zstd_encode
from fedloom.core.errors import ModelRejected, TaskError, UpdateRejected
from fedloom.core.weights import (
    TensorSpec,
    Weights,
    dtype_from_name,
    dtype_name,
    is_float,
    specs_of,
)

SEPARATOR = "@"
"""Joins a tensor's name and the name of one of its parts: ``w@scale``."""
INT8_BLOCK = 1024
"""Values sharing one int8 scale (its float32 costs 4 bytes per 1,024)."""
INT8_LEVELS = 127
"""int8 codes run from -127 to 127; -128 is never sent (and refused)."""

_WIDE = frozenset({"float32", "float64"})  # what the casts narrow
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class Codec(enum.Enum):
    """How a site's update travels (the plan's ``compression.update``)."""

    NONE = "none"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"
    TOPK = "topk"
    ZSTD = "zstd"

    @property
    def lossy(self) -> bool:
        """True unless the aggregator gets back exactly what the site sent."""
        return self not in (Codec.NONE, Codec.ZSTD)


class ModelCodec(enum.Enum):
    """How the global model travels to the sites (the plan's ``compression.model``)."""

    NONE = "none"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True, kw_only=True)
class Compression:
    """The compression in force: the update's codec (with topk's fraction) and the
    global model's."""

    update: Codec = Codec.NONE
    topk_fraction: float = 0.01
    model: ModelCodec = ModelCodec.NONE

    @property
    def active(self) -> bool:
        return self.update is not Codec.NONE or self.model is not ModelCodec.NONE

    def parameters(self) -> dict[str, object]:
        """The update's codec and its parameters, as plain JSON (for the audit log)."""
        params: dict[str, object] = {"codec": self.update.value}
        if self.update is Codec.INT8:
            params["block"] = INT8_BLOCK
        elif self.update is Codec.TOPK:
            params["fraction"] = self.topk_fraction
            params["error_feedback"] = True
        elif self.update is Codec.ZSTD:
            params["level"] = ZSTD_LEVEL
        return params


@dataclass(frozen=True, slots=True)
class Part:
    """One encoded array of a model tensor: its name, dtype and shape, or (``shape`` None)
    a flat array of at most ``max_size`` elements (zstd's frame)."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    max_size: int = 0

    def admits(self, spec: TensorSpec) -> bool:
        if spec.name != self.name or spec.dtype != self.dtype:
            return False
        if self.shape is not None:
            return spec.shape == self.shape
        return len(spec.shape) == 1 and spec.shape[0] <= self.max_size

    def describe(self) -> str:
        shape = f"[at most {self.max_size}]" if self.shape is None else str(list(self.shape))
        return f"{self.name!r} {self.dtype}{shape}"


# ------------------------------------------------------------------ layout


def parts_of(spec: TensorSpec, compression: Compression) -> tuple[Part, ...]:
    """The parts model tensor ``spec`` travels as under ``compression.update``."""
    codec, name, size = compression.update, spec.name, spec.size
    same = (Part(name, spec.dtype, spec.shape),)
    if codec is Codec.ZSTD:
        return (Part(_part(name, "zstd"), "uint8", None, zstd_bound(spec.nbytes)),)
    floating = is_float(dtype_from_name(spec.dtype))
    if codec is Codec.NONE or not floating:
        return same
    if codec in (Codec.FLOAT16, Codec.BFLOAT16):
        return (Part(name, codec.value, spec.shape),) if spec.dtype in _WIDE else same
    if codec is Codec.INT8:
        blocks = -(-size // INT8_BLOCK)
        return (Part(name, "int8", spec.shape), Part(_part(name, "scale"), "float32", (blocks,)))
    k = topk_count(size, compression.topk_fraction)
    return (
        Part(_part(name, "idx"), dtype_name(_index_dtype(size)), (k,)),
        Part(_part(name, "val"), spec.dtype, (k,)),
    )


def topk_count(size: int, fraction: float) -> int:
    """How many values topk keeps of a tensor of ``size``: ``ceil(fraction * size)``, at
    least one of a tensor that has any."""
    return min(size, max(1, math.ceil(fraction * size - 1e-9))) if size else 0


def reserved_name_problem(specs: Sequence[TensorSpec]) -> str | None:
    """Why these tensors cannot be compressed (a name holds the part separator), or None."""
    clashing = [s.name for s in specs if SEPARATOR in s.name]
    if not clashing:
        return None
    return (
        f"the model's tensor names {clashing[:3]} hold {SEPARATOR!r}, which compression "
        "reserves for the parts of an encoded tensor; rename them, or set compression.update "
        "and compression.model to none"
    )


def check_encoded(
    sent: Sequence[TensorSpec], model: Sequence[TensorSpec], compression: Compression
) -> tuple[int, ...]:
    """How many parts each model tensor has, once ``sent`` (what an update announces) is
    found to be the encoding of ``model``; :class:`UpdateRejected` naming the first
    mismatch otherwise."""
    codec = compression.update.value
    layout = [parts_of(spec, compression) for spec in model]
    expected = [(spec, part) for spec, parts in zip(model, layout, strict=True) for part in parts]
    if len(sent) != len(expected):
        raise UpdateRejected(
            f"update encoded as {codec} has {len(sent)} tensors; the {codec} encoding of the "
            f"global model's {len(model)} tensors has {len(expected)}"
        )
    for got, (spec, part) in zip(sent, expected, strict=True):
        if not part.admits(got):
            raise UpdateRejected(
                f"tensor {got.name!r} {got.dtype}{list(got.shape)} is not part of the {codec} "
                f"encoding of the global model's {spec.name!r} {spec.dtype}{list(spec.shape)}: "
                f"expected {part.describe()}"
            )
    return tuple(len(parts) for parts in layout)


# ------------------------------------------------------------------ encoding


def encode(
    update: Mapping[str, np.ndarray],
    compression: Compression,
    *,
    rng: np.random.Generator,
    specs: Sequence[TensorSpec] | None = None,
) -> Weights:
    """``update`` encoded as ``compression.update`` says. ``specs`` are the dtypes and
    shapes the receiver decodes to (default: the update's own; a site's error feedback
    passes float64 sums of a float32 model's update). ``rng`` drives int8's stochastic
    rounding. :class:`TaskError` for an update that cannot be encoded (NaN, a value beyond
    float16's range)."""
    targets = tuple(specs) if specs is not None else specs_of(update)
    problem = reserved_name_problem(targets)
    if problem is not None and compression.update is not Codec.NONE:
        raise TaskError(problem)
    out: Weights = {}
    for spec in targets:
        out.update(encode_tensor(spec, update[spec.name], compression, rng))
    return out


def encode_tensor(
    spec: TensorSpec, values: np.ndarray, compression: Compression, rng: np.random.Generator
) -> Weights:
    """The parts of one tensor (decoded to ``spec``), in the order of :func:`parts_of`."""
    codec, name = compression.update, spec.name
    dtype = dtype_from_name(spec.dtype)
    x = np.asarray(values)
    if tuple(x.shape) != spec.shape:
        raise TaskError(f"the update's tensor {name!r} has shape {x.shape}, not {spec.shape}")
    if codec is Codec.ZSTD:
        return {_part(name, "zstd"): zstd_encode(x.astype(dtype, copy=False))}
    floating = is_float(dtype)
    if codec is Codec.NONE or not floating:
        return {name: x.astype(dtype, copy=False)}
    wide = np.asarray(x, dtype=np.float64)
    if not np.isfinite(wide).all():
        raise TaskError(
            f"the update's tensor {name!r} holds NaN or infinite values: it is not sent "
            "(check the learning rate and the data)"
        )
    if codec in (Codec.FLOAT16, Codec.BFLOAT16):
        if spec.dtype not in _WIDE:
            return {name: x.astype(dtype, copy=False)}
        if codec is Codec.FLOAT16 and wide.size and np.abs(wide).max() > _FLOAT16_MAX:
            raise TaskError(
                f"the update's tensor {name!r} holds values beyond float16's range "
                f"(+-{_FLOAT16_MAX:g}): it cannot travel as float16; use compression.update: "
                "bfloat16"
            )
        return {name: wide.astype(np.float16 if codec is Codec.FLOAT16 else _BFLOAT16)}
    if codec is Codec.INT8:
        codes, scale = int8_encode(wide, rng)
        return {name: codes, _part(name, "scale"): scale}
    idx, val = topk_encode(wide, compression.topk_fraction)
    return {_part(name, "idx"): idx, _part(name, "val"): val.astype(dtype)}


def int8_encode(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Int8 codes (same shape) and one float32 step per block of :data:`INT8_BLOCK`,
    stochastically rounded: unbiased, each value off by less than one step."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    step = int8_steps(flat)
    per_value = np.repeat(step.astype(np.float64), INT8_BLOCK)[: flat.size]
    scaled = np.divide(flat, per_value, out=np.zeros_like(flat), where=per_value > 0)
    codes = np.floor(scaled + rng.random(flat.size))
    return codes.astype(np.int8).reshape(np.shape(values)), step


def int8_steps(flat: np.ndarray) -> np.ndarray:
    """Each block's step: ``max |x| / 127`` as a float32, rounded up so that no value of
    the block exceeds 127 steps."""
    blocks = -(-flat.size // INT8_BLOCK)
    padded = np.zeros(blocks * INT8_BLOCK)
    padded[: flat.size] = np.abs(flat)
    peak = padded.reshape(blocks, INT8_BLOCK).max(axis=1)
    with np.errstate(over="ignore"):
        step = (peak / INT8_LEVELS).astype(np.float32)
    wide = step.astype(np.float64)
    ratio = np.divide(peak, wide, out=np.full_like(peak, np.inf), where=wide > 0)
    short = (peak > 0) & (ratio > INT8_LEVELS)  # rounded down, or to zero
    step = np.where(short, np.nextafter(step, np.float32(np.inf)), step).astype(np.float32)
    checked: np.ndarray = step
    if not np.isfinite(step).all():
        raise TaskError("the update holds values beyond float32's range: it cannot travel as int8")
    return checked


def topk_encode(values: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The ascending flat indices of the ``ceil(fraction * size)`` values of largest
    magnitude, and those values."""
    flat = np.asarray(values).reshape(-1)
    size = flat.size
    k = topk_count(size, fraction)
    if k == size:
        idx = np.arange(size)
    else:
        magnitude = np.abs(flat.astype(np.float64, copy=False))
        idx = np.sort(np.argpartition(magnitude, size - k)[size - k :])
    return idx.astype(_index_dtype(size)), flat[idx]


# ------------------------------------------------------------------ decoding


def decode(
    encoded: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], compression: Compression
) -> Weights:
    """The update ``encoded`` stands for, in the dtypes and shapes of ``specs``;
    :class:`UpdateRejected` if it is not a valid encoding of them."""
    arrays = list(encoded.values())
    counts = check_encoded(specs_of(encoded), specs, compression)
    out: Weights = {}
    start = 0
    for spec, count in zip(specs, counts, strict=True):
        out[spec.name] = decode_tensor(spec, arrays[start : start + count], compression)
        start += count
    return out


def decode_tensor(
    spec: TensorSpec, parts: Sequence[np.ndarray], compression: Compression
) -> np.ndarray:
    """Model tensor ``spec`` from its parts (already checked against :func:`parts_of`)."""
    codec, name = compression.update, spec.name
    dtype = dtype_from_name(spec.dtype)
    if codec is Codec.ZSTD:
        return zstd_decode(spec, parts[0])
    if len(parts) == 1:  # travelled as it is, or cast
        return np.asarray(parts[0]).astype(dtype).reshape(spec.shape)
    if codec is Codec.INT8:
        codes, step = np.asarray(parts[0]), np.asarray(parts[1], dtype=np.float32)
        if not (np.isfinite(step).all() and (step >= 0).all()):
            raise UpdateRejected(
                f"tensor {name!r}: its int8 scale holds NaN, infinite or negative values"
            )
        if codes.size and int(codes.min()) < -INT8_LEVELS:
            raise UpdateRejected(f"tensor {name!r}: int8 code -128 is outside [-127, 127]")
        per_value = np.repeat(step.astype(np.float64), INT8_BLOCK)[: codes.size]
        return (codes.reshape(-1) * per_value).astype(dtype).reshape(spec.shape)
    idx, val = np.asarray(parts[0]), np.asarray(parts[1])
    if idx.size:
        if int(idx.max()) >= spec.size:
            raise UpdateRejected(
                f"tensor {name!r}: topk index {int(idx.max())} is out of range for "
                f"{spec.size} values"
            )
        if idx.size > 1 and not (np.diff(idx.astype(np.int64)) > 0).all():
            raise UpdateRejected(f"tensor {name!r}: topk indices repeat or are not ascending")
    dense = np.zeros(spec.size, dtype=dtype)
    dense[idx.astype(np.int64)] = val
    return dense.reshape(spec.shape)


# ------------------------------------------------------------------ the model


def encode_model(weights: Mapping[str, np.ndarray], codec: ModelCodec) -> Weights:
    """The global model as it travels to the sites: each float32 or float64 tensor ``w``
    cast to ``codec`` and named ``w@float32`` (or ``@float64``), so a site restores its
    dtype; other tensors as they are."""
    if codec is ModelCodec.NONE:
        return dict(weights)
    narrow = np.float16 if codec is ModelCodec.FLOAT16 else _BFLOAT16
    out: Weights = {}
    for name, array in weights.items():
        kind = dtype_name(np.asarray(array).dtype)
        if kind in _WIDE:
            out[_part(name, kind)] = np.asarray(array).astype(narrow)
        else:
            out[name] = array
    return out


def decode_model(weights: Mapping[str, np.ndarray], codec: ModelCodec) -> Weights:
    """The global model from what :func:`encode_model` sent; :class:`ModelRejected`
    for a tensor that is not such a cast."""
    if codec is ModelCodec.NONE:
        return dict(weights)
    out: Weights = {}
    for name, array in weights.items():
        base, sep, kind = name.rpartition(SEPARATOR)
        if not sep:
            out[name] = array
            continue
        got = dtype_name(np.asarray(array).dtype)
        if kind not in _WIDE or got != codec.value or base in out or not base:
            raise ModelRejected(
                f"global model tensor {name!r} ({got}) is not a {codec.value} cast of a "
                "float32 or float64 tensor"
            )
        out[base] = np.asarray(array).astype(dtype_from_name(kind))
    return out


# ------------------------------------------------------------------ helpers


def _part(name: str, part: str) -> str:
    return f"{name}{SEPARATOR}{part}"


def _index_dtype(size: int) -> np.dtype:
    return np.dtype(np.uint32 if size <= 2**32 else np.uint64)
