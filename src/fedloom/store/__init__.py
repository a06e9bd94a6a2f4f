"""Aggregator state on disk: safetensors for tensors (never pickle).

The checkpoint functions (numpy, safetensors) are imported on first use, so reading the
state database (``fedloom status``) imports neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedloom.store.checkpoint import load_state, load_weights, save_state, save_weights

__all__ = ["load_state", "load_weights", "save_state", "save_weights"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'fedloom.store' has no attribute {name!r}")
    value = getattr(importlib.import_module("fedloom.store.checkpoint"), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
