"""Aggregator state on disk: safetensors for tensors (never pickle)."""

from fedloom.store.checkpoint import load_state, load_weights, save_state, save_weights

__all__ = ["load_state", "load_weights", "save_state", "save_weights"]
