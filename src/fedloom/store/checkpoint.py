"""Weights and strategy state as safetensors files, written atomically.

A file is written to a temporary name in the same folder, fsynced, then renamed over
the target, so a crash leaves either the old file or the new one, never half of one.
A strategy state file carries the SHA-256 of its tensors in its own header, so a file
damaged on disk later (a flipped bit, a truncation) is found when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.numpy as st

from fedloom.core.errors import StateError
from fedloom.core.files import replace_atomically
from fedloom.core.state import FederationState, StrategyState
from fedloom.core.weights import Weights

_ORDER_KEY = "fedloom.order"
_SCALARS_KEY = "fedloom.scalars"
_DIGEST_KEY = "fedloom.sha256"
_LEDGER_KEY = "fedloom.privacy_ledger"  # the federation state's privacy ledger (JSON)
_OLD_LEDGER = "privacy"  # the strategy scalar that held the ledger before it had its own key
_MAX_HEADER = 100 * 1024 * 1024
_WEIGHTS_GROUP = "weights"


def _contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous and little-endian (safetensors' byte order), shape kept
    (``np.ascontiguousarray`` turns 0-d into 1-d)."""
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.require(array, requirements="C")


_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def _write_safetensors(
    fh: BinaryIO, tensors: Mapping[str, np.ndarray], meta: dict[str, str]
) -> None:
    """Write the safetensors format straight from each array's memory: no copy of the
    whole file is built (a checkpoint can be several times a GiB-sized model)."""
    header: dict[str, Any] = {"__metadata__": meta}
    arrays = {name: _contiguous(arr) for name, arr in tensors.items()}
    offset = 0
    for name, arr in arrays.items():
        code = _SAFETENSORS_DTYPES.get(arr.dtype.name)
        if code is None:
            raise StateError(f"tensor {name!r} has dtype {arr.dtype}, which safetensors lacks")
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    fh.write(len(text).to_bytes(8, "little"))
    fh.write(text)
    for arr in arrays.values():
        if arr.nbytes:
            fh.write(arr.reshape(-1).view(np.uint8).data)


def _atomic_write(
    path: Path,
    write: Callable[[BinaryIO], None],
    before_rename: Callable[[Path], None] | None = None,
) -> None:
    """``path.tmp`` written, then renamed over ``path`` (a crash leaves the .tmp only)."""
    tmp = path.with_name(path.name + ".tmp")
    replace_atomically(path, write, tmp=tmp, make_folder=True, before_rename=before_rename)


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len > min(_MAX_HEADER, os.fstat(fh.fileno()).st_size - 8):
                raise ValueError(f"header length {header_len} out of range")
            header = json.loads(fh.read(header_len))
    except OSError as err:
        raise StateError(f"cannot read {path}: {err.strerror}") from err
    except ValueError as err:
        raise StateError(
            f"{path} is not a valid safetensors file (unreadable header)",
            hint="the file is truncated or corrupt; restore it or start a new run",
        ) from err
    try:
        # load_file, not load(bytes): only the file reader knows bfloat16
        tensors = st.load_file(path)
    except Exception as err:  # safetensors raises its own types for truncated files
        raise StateError(
            f"{path} is not a valid safetensors file ({err})",
            hint="the file is truncated or corrupt; restore it or start a new run",
        ) from err
    return tensors, dict(header.get("__metadata__") or {})


def _weights_meta(weights: Weights) -> dict[str, str]:
    return {_ORDER_KEY: json.dumps(list(weights))}


def save_weights(
    path: str | os.PathLike[str], weights: Weights, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``weights`` to ``path`` atomically, keeping tensor order and dtypes;
    ``metadata`` adds strings to the header (:func:`read_metadata` reads them)."""
    meta = {**dict(metadata or {}), **_weights_meta(weights)}
    _atomic_write(Path(path), lambda fh: _write_safetensors(fh, weights, meta))


def load_weights(path: str | os.PathLike[str]) -> Weights:
    """Read weights written by :func:`save_weights`, in their original order."""
    tensors, meta = _read(Path(path))
    order = json.loads(meta[_ORDER_KEY]) if _ORDER_KEY in meta else sorted(tensors)
    return {name: tensors[name] for name in order}


def tensors_digest(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str] = {}) -> str:  # noqa: B006 - read only
    """SHA-256 over the header's other metadata (the tensor order, the scalars …), then
    each tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    h.update(
        json.dumps({k: v for k, v in meta.items() if k != _DIGEST_KEY}, sort_keys=True).encode()
    )
    for name in sorted(tensors):
        arr = _contiguous(tensors[name])
        h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode())
        h.update(arr.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def save_state(
    path: str | os.PathLike[str],
    state: StrategyState,
    *,
    metadata: Mapping[str, str] | None = None,
    before_rename: Callable[[Path], None] | None = None,
) -> None:
    """Write a strategy state (global weights, named array groups, JSON scalars) with
    the digest of its tensors; ``metadata`` adds strings to the header."""
    flat: dict[str, np.ndarray] = {}
    order: dict[str, list[str]] = {_WEIGHTS_GROUP: list(state.weights)}
    for name, arr in state.weights.items():
        flat[f"{_WEIGHTS_GROUP}/{name}"] = _contiguous(arr)
    for group, arrays in state.arrays.items():
        if group == _WEIGHTS_GROUP or "/" in group:
            raise StateError(f"strategy state group name {group!r} is reserved or has a '/'")
        order[group] = list(arrays)
        for name, arr in arrays.items():
            flat[f"{group}/{name}"] = _contiguous(arr)
    meta = {
        **dict(metadata or {}),
        _ORDER_KEY: json.dumps(order),
        _SCALARS_KEY: json.dumps(dict(state.scalars), sort_keys=True),
    }
    meta[_DIGEST_KEY] = tensors_digest(flat, meta)
    _atomic_write(Path(path), lambda fh: _write_safetensors(fh, flat, meta), before_rename)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata in a safetensors file's header (without reading tensors)."""
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len > min(_MAX_HEADER, os.fstat(fh.fileno()).st_size - 8):
                raise ValueError("header length out of range")
            header = json.loads(fh.read(header_len))
        return dict(header.get("__metadata__") or {})
    except OSError as err:
        raise StateError(f"cannot read {path}: {err.strerror}") from err
    except (ValueError, AttributeError) as err:
        raise StateError(f"{path} is not a valid safetensors file (unreadable header)") from err


def save_federation_state(
    path: str | os.PathLike[str],
    state: FederationState,
    *,
    metadata: Mapping[str, str] | None = None,
    before_rename: Callable[[Path], None] | None = None,
) -> None:
    """Write the strategy's state and the privacy ledger in one file (one rename: never
    one without the other)."""
    ledger = {} if state.ledger is None else {_LEDGER_KEY: json.dumps(dict(state.ledger))}
    meta = {**dict(metadata or {}), **ledger}
    save_state(path, state.strategy, metadata=meta, before_rename=before_rename)


def load_federation_state(path: str | os.PathLike[str]) -> FederationState:
    """Read what :func:`save_federation_state` wrote. A checkpoint written before the
    ledger had its own key kept it in the strategy's scalars: it is taken from there."""
    strategy, meta = _load_state(Path(path))
    if _LEDGER_KEY in meta:
        try:
            ledger = json.loads(meta[_LEDGER_KEY])
        except ValueError:
            ledger = None
        if not isinstance(ledger, dict):
            raise StateError(f"{path} is not a fedloom federation state (its privacy ledger)")
        return FederationState(strategy, ledger)
    scalars = dict(strategy.scalars)
    old = scalars.pop(_OLD_LEDGER, None)
    if not isinstance(old, dict):
        return FederationState(strategy)
    return FederationState(strategy.evolve(scalars=scalars), old)


def load_state(path: str | os.PathLike[str]) -> StrategyState:
    """Read a strategy state written by :func:`save_state`; a file whose tensors do not
    match the digest in its header is refused (:class:`StateError`)."""
    return _load_state(Path(path))[0]


def _load_state(path: Path) -> tuple[StrategyState, dict[str, str]]:
    tensors, meta = _read(path)
    if _DIGEST_KEY in meta and tensors_digest(tensors, meta) != meta[_DIGEST_KEY]:
        raise StateError(
            f"{path} is corrupt: its tensors do not match the SHA-256 recorded in it",
            hint="the file was damaged on disk; restore it or start a new run",
        )
    try:
        order: dict[str, list[str]] = json.loads(meta[_ORDER_KEY])
        scalars = json.loads(meta[_SCALARS_KEY])
        groups = {
            group: {name: tensors[f"{group}/{name}"] for name in names}
            for group, names in order.items()
        }
    except (KeyError, ValueError) as err:
        raise StateError(f"{path} is not a fedloom strategy state ({err})") from err
    weights = groups.pop(_WEIGHTS_GROUP)
    return StrategyState(weights=weights, arrays=groups, scalars=scalars), meta


def is_state_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a strategy state (an aggregator's checkpoint), not weights."""
    return _SCALARS_KEY in read_metadata(path)
