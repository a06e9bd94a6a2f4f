"""Frozen records: what a site is asked and what it answers.

Failures are data, not exceptions: a strategy receives them next to the results and
the run history keeps them.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy stays unimported for `fedloom status`, which reads records
    import numpy as np

    from fedloom.core.weights import Weights

Metrics = Mapping[str, float]
JSON = Any  # a value that json.dumps accepts


class InstructionKind(enum.Enum):
    """What a collaborator is asked to do."""

    TRAIN = "train"  # evaluate the global model, train from it, evaluate the local model
    EVALUATE = "evaluate"  # evaluate the global model only
    FINISHED = "finished"  # the federation is over: disconnect (``Instruction.ending`` says how)


class Ending(enum.Enum):
    """How a federation ended, as its "finished" instruction tells the sites."""

    COMPLETED = "completed"  # every round ran: the sites disconnect
    STOPPED = "stopped"  # the aggregator stopped before (interrupted, failed): it resumes
    CANCELLED = "cancelled"  # its operator cancelled it: the run never resumes


class FailureKind(enum.Enum):
    TIMEOUT = "timeout"  # the round's deadline passed before the site answered
    REJECTED = "rejected"  # the aggregator refused the update (NaN, shape, stale round …)
    ERROR = "error"  # the site reported that its task failed
    DISCONNECTED = "disconnected"  # the stream or the site's process broke off
    CANCELLED = "cancelled"  # not waited for: the round could no longer reach its quorum
    WITHDRAWN = "withdrawn"  # the site withdrew (its data does not fit …): not waited for


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Local training settings a site receives for one round."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: weight of (mu / 2) * ||w - w_global||^2
    evaluate: bool = True  # evaluate the global and the trained model on the validation split


@dataclass(frozen=True, slots=True)
class RoundConfig:
    """What a strategy asks of one round's sites (``Strategy.configure``): the round's
    training settings, and options for the task (``SiteContext.options``)."""

    settings: TrainSettings
    options: Mapping[str, JSON] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """The plan's settings of the built-in training loop that stay at the site (never
    on the wire: every site reads them from the plan it approved)."""

    optimizer: str = "sgd"  # sgd | adam | adamw
    schedule: str = "constant"  # the learning rate across rounds: constant | cosine | linear
    grad_accumulation: int = 1  # minibatches whose gradients make one optimiser step
    grad_clip: float = 0.0  # the largest L2 norm of the gradient (0: no clipping)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward pass)
    deterministic: bool = False  # torch.use_deterministic_algorithms


@dataclass(frozen=True, slots=True)
class PersonalSettings:
    """Ditto's personal model at each site (the plan's ``training.personal``)."""

    lam: float = 0.1  # the weight of (lam / 2) * ||v - w_global||^2 in its loss
    epochs: int = 1  # its local epochs in each round the site trains


class Accountant(enum.Enum):
    """How noise becomes epsilon (the plan's ``privacy.accountant``): Rényi DP, or the
    privacy loss distribution. Every epsilon fedloom reports names the one used."""

    RDP = "rdp"  # Rényi DP (Mironov, 2017): an upper bound, the classic choice
    PLD = "pld"  # privacy loss distributions (Koskela et al.; Doroshenko et al., 2022)


@dataclass(frozen=True, slots=True)
class DPSGDSettings:
    """Sample-level DP-SGD for a site's training (the plan's ``privacy.dp_sgd``)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: Accountant = Accountant.RDP  # the plan's privacy.accountant


@dataclass(frozen=True, slots=True)
class Instruction:
    """One unit of work for one site."""

    round: int
    kind: InstructionKind
    settings: TrainSettings = field(default_factory=TrainSettings)
    config: Mapping[str, JSON] = field(default_factory=dict)
    exchange_steps: tuple[str, ...] = ()  # exchanges before training (e.g. secure aggregation keys)
    # this opening of the round, RUN/ROUND.ATTEMPT: an answer to another one is stale
    attempt_id: str = ""
    # what the round's privacy needs beyond the plan (the clipping bound now, epsilon so far)
    privacy: Mapping[str, JSON] = field(default_factory=dict)
    ending: Ending | None = None  # set on a FINISHED instruction only


@dataclass(frozen=True, slots=True)
class TrainOutput:
    """What a task's ``train`` returns: the locally trained weights (not the delta)."""

    weights: Weights
    num_samples: int
    metrics: Metrics = field(default_factory=dict)
    # the optimiser steps the training took (None: not reported); FedNova normalises
    # each site's update by them
    local_steps: int | None = None


@dataclass(frozen=True, slots=True)
class EvalOutput:
    """What a task's ``evaluate`` returns."""

    num_samples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SiteAnswer:
    """What a site's task produced for one instruction, before it is sent."""

    num_samples: int
    metrics: Metrics
    delta: Weights | None  # w_local - w_round; None for an evaluation
    local_steps: int | None = None  # the task's TrainOutput.local_steps


@dataclass(frozen=True, slots=True)
class SiteResult:
    """A site's accepted answer for one round, without its tensors.

    ``num_samples`` is the count used as aggregation weight: the site's claim capped by
    the plan. ``claimed_samples`` keeps what the site said.
    """

    site: str
    round: int
    num_samples: int
    claimed_samples: int
    metrics: Metrics = field(default_factory=dict)
    local_steps: int = 0  # the optimiser steps the site reported (0: none)


@dataclass(frozen=True, slots=True)
class SiteUpdate:
    """One site's update (``w_local - w_round``), for strategies that need each one."""

    site: str
    num_samples: int
    delta: Weights


@dataclass(frozen=True, slots=True)
class Failure:
    """A site that did not contribute to a round, and why."""

    site: str
    round: int
    kind: FailureKind
    reason: str


@dataclass(frozen=True, slots=True)
class MeanSummary:
    """What the streaming accumulator folded: the weighted mean of the updates (float32
    for float32, float16 and bfloat16 tensors, float64 for the others)."""

    round: int
    # a plain dict, or for bfloat16/float16 tensors a LazyWeights computing each when read
    mean_delta: Mapping[str, np.ndarray]
    total_weight: float
    results: tuple[SiteResult, ...]  # sorted by site name


@dataclass(frozen=True, slots=True)
class UpdateSet:
    """Every individual update of a round, sorted by site name (robust strategies)."""

    round: int
    updates: tuple[SiteUpdate, ...]
    results: tuple[SiteResult, ...]


Summary = MeanSummary | UpdateSet


def weighted_metrics(results: Iterable[SiteResult]) -> dict[str, float]:
    """Each metric's mean over ``results``, weighted by each site's ``val_samples`` (or
    its sample count; 0 counts as 1).

    Never raises: what the aggregator accepted is checked already
    (:mod:`fedloom.core.sanitize`), but a row stored before those checks may not be. A site
    whose weight is not a finite, non-negative number is left out, and so is a value
    that is not a finite number, or a mean that is not one."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for r in sorted(results, key=lambda r: str(r.site)):
        w = _finite(r.metrics.get("val_samples", r.num_samples))
        if w is None or w < 0:
            continue
        w = w or 1.0
        for k, v in r.metrics.items():
            value = _finite(v)
            if k == "val_samples" or value is None:
                continue
            totals[k] = totals.get(k, 0.0) + w * value
            weights[k] = weights.get(k, 0.0) + w
    means = {k: totals[k] / weights[k] for k in sorted(totals) if weights[k] > 0}
    return {k: m for k, m in means.items() if math.isfinite(m)}


def _finite(value: Any) -> float | None:
    """``value`` as a finite float; None if it is not one."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


class CloseReason(enum.Enum):
    """Why an attempt closed. The value is a stable id (what SQLite, ``metrics.jsonl``,
    ``summary.json`` and ``status --json`` hold); :attr:`text` says it in words."""

    ALL_ANSWERED = "all_answered"
    QUORUM = "quorum"  # every site settled: some failed, enough answered
    DEADLINE_QUORUM = "deadline_quorum"
    NO_QUORUM = "no_quorum"
    STOPPED = "stopped"  # the aggregator stopped (interrupted, or its process died)
    # aggregated, as its checkpoint shows; why it closed was lost with the state database
    REBUILT = "rebuilt"

    @property
    def text(self) -> str:
        """The reason in words, for people."""
        return CLOSE_REASON_TEXT[self]


CLOSE_REASON_TEXT = {
    CloseReason.ALL_ANSWERED: "all answered",
    CloseReason.QUORUM: "every site settled, quorum met",
    CloseReason.DEADLINE_QUORUM: "deadline, quorum met",
    CloseReason.NO_QUORUM: "no quorum",
    CloseReason.STOPPED: "stopped",
    CloseReason.REBUILT: "rebuilt from its checkpoint",
}


def attempt_id_of(record: Mapping[str, Any]) -> Any:
    """The attempt id a stored JSON object names; files written before protocol 6 call
    it ``task_id``."""
    return record["attempt_id"] if "attempt_id" in record else record.get("task_id")


@dataclass(frozen=True)
class RoundRecord:
    """What one round did: who was asked, who answered, what they reported, and why
    the round closed."""

    round: int
    kind: InstructionKind
    selected: tuple[str, ...]
    results: tuple[SiteResult, ...]
    failures: tuple[Failure, ...]
    close_reason: CloseReason
    attempt: int = 1
    # the privacy spent once this round was aggregated (epsilon, delta, the accountant's
    # name, clip); empty without DP
    privacy: Mapping[str, float | str] = field(default_factory=dict)

    @property
    def aggregated(self) -> bool:
        """A training round whose updates were aggregated into a new model."""
        return self.kind is InstructionKind.TRAIN and self.close_reason not in (
            CloseReason.NO_QUORUM,
            CloseReason.STOPPED,
        )

    @property
    def metrics(self) -> dict[str, float]:
        """Sample-weighted mean of each metric over the sites that answered."""
        return weighted_metrics(self.results)


def finished_rounds(history: Iterable[RoundRecord]) -> list[int]:
    """The training rounds that finished, in order: those aggregated into a new global
    model. The one definition behind every count of rounds done: ``fedloom status``,
    a run's ``summary.json`` (``rounds_finished``) and the live snapshot.

    An attempt that missed its quorum, one the aggregator stopped, and the final
    evaluation finish no round; a round counts once, however many attempts it took.
    ``history`` is what still counts: a resumed run's, read from its state, holds no
    attempt of a round that ran again after the restart."""
    return sorted({r.round for r in history if r.aggregated})
