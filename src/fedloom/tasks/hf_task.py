"""Hugging Face models fine-tuned across sites, with or without a PEFT LoRA adapter.

Every site loads the same pretrained base from its own disk (the plan's ``model.base``,
a folder ``save_pretrained`` wrote, read back with ``from_pretrained(folder)``; the plan
hash covers its files, so a site whose copy differs is refused). Only the federated
tensors travel and are aggregated: the plan's ``model.federated`` says which, ``all``,
``trainable`` (with a LoRA adapter: the adapter's matrices, a few per cent of the
model or less) or fnmatch patterns of their names. Trainable tensors that are not
federated stay at the site, in its state folder, from one round to the next; the frozen
base never changes and never leaves the disk it was on.

Importing this module imports torch, and ``transformers``/``peft`` when a model is
first built (the ``hf`` extra: ``pip install 'fedloom[hf]'``). Nothing is downloaded:
``from_pretrained`` reads the local folder only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sized
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from fedloom.core.errors import TaskError, WorkspaceError
from fedloom.core.records import EvalOutput, TrainOutput, TrainSettings
from fedloom.core.weights import Weights
from fedloom.tasks.base import (
    CLASSIFICATION,
    AnySiteData,
    DataFunctions,
    Metrics,
    ModelSource,
    SiteContext,
)
from fedloom.tasks.hf_model import LoadedModel, load_model
from fedloom.tasks.hf_parts import IGNORED, collate
from fedloom.tasks.torch_loop import as_dataset, head
from fedloom.tasks.torch_steps import (
    Tally,
    accumulated_epoch,
    autocast,
    make_optimizer,
    on_device,
    prox_pairs,
    scaffold_pairs,
)

KINDS = ("causal-lm", "sequence-classification")
LANGUAGE_MODEL = Metrics(primary="perplexity", lower_is_better=("loss", "perplexity"))
BUILD_SEED = 0  # heads from_pretrained initialises are the same at every site

DataFn = Callable[[SiteContext], Any]


class HFTask(DataFunctions):
    """A :class:`~fedloom.tasks.Task` for a ``transformers`` model loaded from the plan's
    ``model.base`` folder::

        task = HFTask("causal-lm", lora={"r": 8, "lora_alpha": 16,
                                         "target_modules": ["q_proj", "v_proj"]},
                      data=load_data, test_data=load_test_data)

    - ``kind``: ``"causal-lm"`` (``AutoModelForCausalLM``: loss and perplexity, perplexity
      primary) or ``"sequence-classification"``
      (``AutoModelForSequenceClassification`` with ``num_labels``: accuracy and loss);
    - ``lora``: the adapter, as ``peft.LoraConfig`` keyword arguments (or a
      ``LoraConfig``); None fine-tunes the model itself;
    - ``data(ctx)`` returns ``(train, val)`` datasets whose items are token-id tensors
      (a causal LM learns to predict each next token), ``(input_ids, label)`` pairs
      (a classifier), or dicts of tensors with ``input_ids`` and ``labels`` (and
      ``attention_mask``), as a ``transformers`` model takes them;
    - ``test_data(ctx)``: the held-out test set, the same kind of dataset.

    A round trains with the plan's optimiser, learning rate and schedule, epochs and
    batch size, gradient clipping and accumulation, bf16 autocast, and FedProx's
    proximal term on the federated tensors; the data is shuffled with the site's seeded
    generator, so a run is reproducible on the CPU.
    """

    supports_dp_sgd: ClassVar[bool] = False
    supports_scaffold: ClassVar[bool] = True  # adds SiteContext.correction to each step
    supports_ditto: ClassVar[bool] = True  # anchors FedProx's term at SiteContext.anchor

    def __init__(
        self,
        kind: str = "causal-lm",
        *,
        lora: Mapping[str, Any] | Any | None = None,
        num_labels: int | None = None,
        data: DataFn | None = None,
        test_data: DataFn | None = None,
    ) -> None:
        if kind not in KINDS:
            raise WorkspaceError(f"HFTask's kind must be one of {', '.join(KINDS)} (got {kind!r})")
        if kind == "sequence-classification" and (num_labels is None or num_labels < 2):
            raise WorkspaceError(
                "HFTask('sequence-classification') needs num_labels, the number of classes "
                f"(at least 2; got {num_labels!r})"
            )
        self.kind = kind
        self.lora = lora
        self.num_labels = num_labels
        self.data_fn = data
        self.test_data_fn = test_data
        self.metrics = LANGUAGE_MODEL if kind == "causal-lm" else CLASSIFICATION
        self.source = ModelSource()
        self._built: LoadedModel | None = None

    # -- the model

    def use_model(self, source: ModelSource) -> None:
        """The plan's model section (the task loader calls this before anything else)."""
        if source != self.source:
            self.source, self._built = source, None

    def _load(self, seed: int) -> LoadedModel:
        return load_model(self.kind, self.source, self.lora, self.num_labels, seed)

    def built(self) -> LoadedModel:
        """The model of this process, built once (the same at every site)."""
        if self._built is None:
            self._built = self._load(BUILD_SEED)
        return self._built

    def init_weights(self, seed: int) -> Weights:
        """The federated tensors of a freshly built model: a LoRA adapter's matrices are
        drawn from ``seed`` (B starts at zero, so round 1 starts from the base itself)."""
        return self._load(seed).federated_weights()

    def model_bytes(self) -> int:
        """The whole model's bytes, the frozen base included: what ``federated: all``
        would send each way, per site and round."""
        return self.built().model_bytes()

    # -- a round

    def train(
        self, weights: Weights, data: AnySiteData, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        context = dataclasses.replace(context, settings=settings)
        train = as_dataset(data.train)
        n = len(train) if isinstance(train, Sized) else 0
        if n < 1:
            raise TaskError("the site's training data is empty (len(train) is 0)")
        built = self.built()
        built.prepare(weights, context)
        model = built.model
        params = [p for p in model.parameters() if p.requires_grad]
        named = dict(model.named_parameters())
        optimizer = make_optimizer(params, settings, context)
        loader = DataLoader(
            train,
            batch_size=max(1, settings.batch_size),
            shuffle=True,
            generator=context.torch_generator(),
            collate_fn=functools.partial(collate, kind=self.kind),
        )
        tally = Tally()
        with on_device(model, context.device):
            anchors = prox_pairs(named, built.federated, settings, context)
            corrections = scaffold_pairs(named, context)
            model.train()
            for _ in range(settings.epochs):
                accumulated_epoch(
                    loader,
                    len(loader),
                    lambda batch: model(**_to(batch, context.device)).loss,
                    optimizer,
                    params,
                    anchors,
                    settings,
                    context,
                    tally,
                    corrections,
                )
            optimizer.zero_grad(set_to_none=True)
            model.train(False)
        if context.anchor is None:  # not a personal model's round (Ditto): that keeps none
            built.keep_site_tensors(context)
        return TrainOutput(built.federated_weights(), n, tally.metrics(), tally.steps)

    def evaluate(self, weights: Weights, data: Any, context: SiteContext) -> EvalOutput:
        dataset = as_dataset(data)
        n = len(dataset) if isinstance(dataset, Sized) else 0
        if n == 0:
            return EvalOutput(0, {})
        built = self.built()
        built.prepare(weights, context)
        built.model.train(False)  # dropout off, as evaluation needs
        loader = DataLoader(
            dataset, batch_size=EVAL_BATCH, collate_fn=functools.partial(collate, kind=self.kind)
        )
        loss_sum, counted, correct = 0.0, 0, 0
        with on_device(built.model, context.device), torch.no_grad():
            for batch in loader:
                batch = _to(batch, context.device)
                with autocast(context):
                    out = built.model(**batch)
                weight = self._positions(batch["labels"])
                loss_sum += float(out.loss.float()) * weight
                counted += weight
                if self.kind == "sequence-classification":
                    predicted = out.logits.float().argmax(dim=-1)
                    correct += int((predicted == batch["labels"]).sum())
        mean = loss_sum / max(counted, 1)
        if self.kind == "causal-lm":
            metrics = {"perplexity": math.exp(min(mean, MAX_LOG_PERPLEXITY)), "loss": mean}
        else:
            metrics = {"accuracy": correct / n, "loss": mean}
        return EvalOutput(n, metrics)

    def check_data(self, weights: Weights, data: AnySiteData, context: SiteContext) -> None:
        """The smoke check before a site joins: the model on a few training samples
        (a token id past the vocabulary, a label past the classes fail here)."""
        train = as_dataset(data.train)
        if not isinstance(train, Sized) or len(train) == 0:
            raise TaskError("the site's training data is empty (len(train) is 0)")
        try:
            self.evaluate(weights, head(train, 4), context)
        except (IndexError, RuntimeError, ValueError) as err:
            raise TaskError(
                f"the model does not take the site's data: {type(err).__name__}: {err}",
                hint="token ids must be below the model's vocab_size, labels below num_labels",
            ) from err

    # -- batches

    def _positions(self, labels: torch.Tensor) -> int:
        """How many predictions a batch's mean loss averages: the next-token positions
        whose label counts (a causal LM), or the batch's rows."""
        if self.kind == "causal-lm":
            return int((labels[:, 1:] != IGNORED).sum())
        return int(labels.shape[0])


EVAL_BATCH = 32
MAX_LOG_PERPLEXITY = 50.0  # e^50: a diverged model's perplexity stays a finite number


def _to(batch: Mapping[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
