"""The state a site keeps between rounds for its own loop (``SiteContext.keep``): an
optimiser's moments, a scheduler's position, a ``GradScaler``'s scale.

What ``state_dict()`` returns is written without pickle: the tensors into one
safetensors file, everything else (nested dicts, lists and tuples of numbers, strings,
booleans and ``None``) as JSON in that file's header, tagged where JSON alone would
lose the type, so that ``load_state_dict`` gets back exactly what was saved:

- ``{"$tensor": "k"}``: the tensor stored under key ``k``;
- ``{"$tuple": [...]}``: a tuple (an optimiser's ``betas``);
- ``{"$dict": [[key, value], ...]}``: a dict whose keys are not all strings (an
  optimiser's ``state`` is keyed by parameter index), or use a ``$`` name;
- ``{"$float": "nan" | "inf" | "-inf"}``: the floats JSON has no word for.

The file is replaced atomically: a crash leaves the previous round's state or the new one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from fedloom.core.errors import TaskError
from fedloom.core.files import write_atomic

KEPT_FILE = "kept.safetensors"  # in the site's state folder
METADATA_KEY = "fedloom.kept"
FORMAT = 1
_TAGS = frozenset({"$tensor", "$tuple", "$dict", "$float"})


# -- the JSON tree: pure functions


def encode(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as a JSON-able tree; its tensors are added to ``tensors`` (CPU copies)."""
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        if value.layout is not torch.strided:
            raise _unkeepable(where, f"a {value.layout} tensor")
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if kind is list:
        return [encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(value)]
    if kind is tuple:
        return {"$tuple": [encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(value)]}
    if kind is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: encode(v, f"{where}[{k!r}]", tensors) for k, v in value.items()}
        return {
            "$dict": [
                [encode(k, f"{where} key {k!r}", tensors), encode(v, f"{where}[{k!r}]", tensors)]
                for k, v in value.items()
            ]
        }
    raise _unkeepable(where, f"a {kind.__module__}.{kind.__qualname__}")


def decode(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The value :func:`encode` turned into ``tree``, with the same types."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1 and next(iter(tree)) in _TAGS:
        ((tag, body),) = tree.items()
        if tag == "$tensor":
            return tensors[body]
        if tag == "$tuple":
            return tuple(decode(v, tensors) for v in body)
        if tag == "$float":
            return float(body)
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in body}
    return {k: decode(v, tensors) for k, v in tree.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _unkeepable(where: str, what: str) -> TaskError:
    return TaskError(
        f"cannot keep {where}: it holds {what}",
        hint="ctx.keep() saves state_dict()s of tensors, numbers, strings, booleans, None, "
        "and lists, tuples and dicts of them; keep that object's state in ctx.state_dir yourself",
    )


# -- the file


def save_kept(path: Path, objects: Mapping[str, Any]) -> None:
    """Write every object's ``state_dict()`` to ``path`` (one safetensors file), atomically."""
    tensors: dict[str, torch.Tensor] = {}
    trees = {
        name: encode(obj.state_dict(), f"{name}.state_dict()", tensors)
        for name, obj in objects.items()
    }
    header = json.dumps({"format": FORMAT, "objects": trees}, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save_tensors(tensors, metadata={METADATA_KEY: header})
    write_atomic(path, data, mode=0o600, error=TaskError)  # the one fsync-and-rename writer


def load_kept(path: Path) -> dict[str, Any]:
    """The states :func:`save_kept` wrote to ``path``, by name ({} when there is no file)."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {})[METADATA_KEY])
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT}")
        return {name: decode(tree, tensors) for name, tree in header["objects"].items()}
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise TaskError(
            f"cannot read the site's kept state {path}: {err}",
            hint=f"delete {path} to start the kept objects afresh",
        ) from err


def restore(path: Path, objects: Mapping[str, Any]) -> list[str]:
    """Load each object's saved state into it (``load_state_dict``); the names restored."""
    for name, obj in objects.items():
        if not (
            callable(getattr(obj, "state_dict", None))
            and callable(getattr(obj, "load_state_dict", None))
        ):
            raise TaskError(
                f"ctx.keep({name}=...) got a {type(obj).__name__}, which has no "
                "state_dict()/load_state_dict()",
                hint="keep torch objects with a state: an optimiser, a learning-rate "
                "scheduler, a GradScaler",
            )
    saved = load_kept(path)
    restored = []
    for name, obj in objects.items():
        if name in saved:
            try:
                obj.load_state_dict(saved[name])
            except (KeyError, ValueError, TypeError, RuntimeError) as err:
                raise TaskError(
                    f"the {name} kept by an earlier round does not fit this one: {err}",
                    hint=f"delete {path} to start afresh (the model or optimiser changed)",
                ) from err
            restored.append(name)
    return restored
