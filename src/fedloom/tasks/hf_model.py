"""The model an :class:`~fedloom.tasks.hf_task.HFTask` trains: the plan's base loaded with
``from_pretrained(folder)``, a PEFT LoRA adapter on it, which of its tensors travel, and
the trainable tensors that stay at each site."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedloom.core.errors import TaskError, WorkspaceError
from fedloom.core.weights import Weights
from fedloom.store.checkpoint import load_weights, save_weights
from fedloom.tasks.base import ModelSource, SiteContext
from fedloom.tasks.hf_parts import federated_names, quiet_transformers
from fedloom.tasks.torch_loop import deterministic
from fedloom.tasks.torch_steps import numpy_to_tensor, tensor_to_numpy

SITE_TENSORS = "hf-site-tensors.safetensors"  # trainable, not federated: kept at the site


@dataclasses.dataclass
class LoadedModel:
    """A process's model, the names of its federated tensors (in the model's order), and
    the first values of its trainable tensors that stay at the sites."""

    model: nn.Module
    federated: tuple[str, ...]
    initial: dict[str, torch.Tensor]

    def prepare(self, weights: Weights, context: SiteContext) -> None:
        """The round's federated tensors into the model, and the site's own trainable
        tensors (its kept values, or the first ones); torch seeded for the call."""
        if len(weights) != len(self.federated) or any(n not in weights for n in self.federated):
            raise TaskError(
                f"weights do not fit the model's federated tensors: expected "
                f"{len(self.federated)} ({self.federated[0]} …), got {len(weights)}",
                hint="every site and the aggregator need the same plan and base model",
            )
        deterministic(context.loop.deterministic)
        torch.manual_seed(context.seed % 2**63)
        own = dict(self.initial)
        path = context.state_dir / SITE_TENSORS if context.state_dir is not None else None
        if own and path is not None and path.is_file():
            kept = load_weights(path)
            own.update({n: numpy_to_tensor(kept[n]) for n in own if n in kept})
        state = self.model.state_dict()
        with torch.no_grad():
            for name in self.federated:
                state[name].copy_(numpy_to_tensor(weights[name]))
            for name, value in own.items():
                state[name].copy_(value)

    def keep_site_tensors(self, context: SiteContext) -> None:
        """Save the site's own trainable tensors in its state folder (after training)."""
        if self.initial and context.state_dir is not None:
            state = self.model.state_dict()
            save_weights(
                context.state_dir / SITE_TENSORS,
                {n: tensor_to_numpy(state[n]) for n in self.initial},
            )

    def federated_weights(self) -> Weights:
        state = self.model.state_dict()
        return {n: tensor_to_numpy(state[n]) for n in self.federated}

    def model_bytes(self) -> int:
        """The whole model's bytes, a frozen base included."""
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())


def load_model(
    kind: str, source: ModelSource, lora: Any, num_labels: int | None, seed: int
) -> LoadedModel:
    """The base of ``source`` with the adapter ``lora`` on it (None: none), torch seeded
    with ``seed`` first (the adapter's and any new head's first values)."""
    model = _from_pretrained(kind, source, num_labels, seed)
    if lora is not None:
        model = _with_adapter(model, lora, kind)
    model.train(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    state = model.state_dict()
    federated = federated_names(list(state), trainable, source.federated)
    if not federated:
        raise WorkspaceError(
            f"model.federated: {source.federated!r} matches no tensor of the model",
            hint=f"its tensors are named like {next(iter(state), '?')}",
        )
    chosen = set(federated)
    initial = {n: state[n].detach().clone() for n in trainable if n not in chosen}
    return LoadedModel(model, tuple(federated), initial)


def _from_pretrained(
    kind: str, source: ModelSource, num_labels: int | None, seed: int
) -> nn.Module:
    folder = source.base
    if folder is None:
        raise WorkspaceError(
            "HFTask loads a pretrained model, but the plan names none",
            hint="add `model: {base: <folder save_pretrained wrote>}` to federation.yaml",
        )
    quiet_transformers()
    try:
        import transformers
    except ImportError as err:
        raise WorkspaceError(
            f"HFTask needs transformers: {err}", hint="pip install 'fedloom[hf]'"
        ) from err
    auto = (
        transformers.AutoModelForCausalLM
        if kind == "causal-lm"
        else transformers.AutoModelForSequenceClassification
    )
    extra: dict[str, Any] = {"num_labels": num_labels} if num_labels else {}
    torch.manual_seed(seed)
    try:
        model: Any = auto.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, **extra
        )
    except (OSError, ValueError) as err:
        raise WorkspaceError(f"model.base: cannot load {folder}: {err}") from err
    if kind == "sequence-classification" and model.config.pad_token_id is None:
        raise WorkspaceError(
            f"model.base: {folder}'s config has no pad_token_id, and a classifier needs "
            "one to find each sequence's last token",
            hint="set model.config.pad_token_id (the tokenizer's pad token) before save_pretrained",
        )
    return model  # type: ignore[no-any-return]


def _with_adapter(model: nn.Module, lora: Any, kind: str) -> nn.Module:
    try:
        import peft
    except ImportError as err:
        raise WorkspaceError(
            f"HFTask's lora needs peft: {err}", hint="pip install 'fedloom[hf]'"
        ) from err
    config = lora
    if isinstance(config, Mapping):
        task_type = "CAUSAL_LM" if kind == "causal-lm" else "SEQ_CLS"
        try:
            config = peft.LoraConfig(**{"task_type": task_type, **config})
        except (TypeError, ValueError) as err:
            raise WorkspaceError(f"HFTask's lora: {err}") from err
    try:
        return peft.get_peft_model(model, config)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as err:
        raise WorkspaceError(f"HFTask's lora does not fit the base model: {err}") from err
