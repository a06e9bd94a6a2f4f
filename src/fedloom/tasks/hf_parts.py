"""The parts of :class:`~fedloom.tasks.hf_task.HFTask` that need no model: which tensors
are federated, how dataset items become a batch, and a quiet ``transformers``."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedloom.core.errors import TaskError

IGNORED = -100  # a label position the loss skips (padding), as in transformers


def federated_names(
    names: list[str], trainable: list[str], federated: str | tuple[str, ...]
) -> list[str]:
    """The tensors that travel, in the model's order: every one (``all``), the trainable
    ones (``trainable``), or those matching one of the patterns."""
    if federated == "all":
        return list(names)
    if federated == "trainable":
        chosen = set(trainable)
        return [n for n in names if n in chosen]
    patterns = (federated,) if isinstance(federated, str) else federated
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def collate(items: list[Any], kind: str) -> dict[str, torch.Tensor]:
    """A batch as the model takes it, from items of one shape: token-id tensors (a
    causal LM's labels are its inputs), ``(input_ids, label)`` pairs, or dicts."""
    from torch.utils.data import default_collate

    if not items:
        raise TaskError("an empty batch")
    first = items[0]
    if isinstance(first, Mapping):
        batch = dict(default_collate(items))
    elif isinstance(first, tuple | list) and len(first) == 2:
        ids, labels = default_collate(items)
        batch = {"input_ids": ids, "labels": labels}
    elif isinstance(first, torch.Tensor):
        batch = {"input_ids": default_collate(items)}
    else:
        raise TaskError(
            f"a dataset item is a {type(first).__name__}; HFTask takes token-id tensors, "
            "(input_ids, label) pairs or dicts with input_ids and labels"
        )
    if "input_ids" not in batch:
        raise TaskError("a dataset item has no input_ids")
    if "labels" not in batch:
        if kind != "causal-lm":
            raise TaskError("a classifier's dataset items need labels: (input_ids, label)")
        batch["labels"] = batch["input_ids"].clone()
    batch["input_ids"] = batch["input_ids"].long()
    batch["labels"] = batch["labels"].long()
    return batch


def quiet_transformers() -> None:
    """No progress bars or advice from transformers on a site's console: fedloom shows
    its own progress, and there is nothing to download."""
    import os
    import warnings

    # transformers' own deprecation notices, raised inside peft's calls, not the user's
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def save_base_model(model: nn.Module, folder: Path) -> Path:
    """Write ``model`` with ``save_pretrained`` (safetensors) into ``folder``: a base
    model a plan can name. Returns the folder."""
    quiet_transformers()
    model.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
    return folder
