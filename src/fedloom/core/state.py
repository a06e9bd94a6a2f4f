"""The federation's explicit, immutable state: the strategy's, and the privacy ledger."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedloom.core.weights import Weights


@dataclass(frozen=True)
class StrategyState:
    """Everything a strategy carries between rounds.

    ``weights`` is the global model. ``arrays`` holds named groups of tensors (FedAdam's
    ``"m"`` and ``"v"`` moments, FedAvgM's ``"momentum"``), ``scalars`` holds JSON values
    (a step count). Saved and loaded as one safetensors file by :mod:`fedloom.store`, so
    every strategy can be checkpointed without special cases.
    """

    weights: Weights
    arrays: Mapping[str, Weights] = field(default_factory=dict)
    scalars: Mapping[str, Any] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> StrategyState:
        return replace(self, **changes)


PrivacyLedger = Mapping[str, Any]
"""The privacy ledger (JSON): the clipping bound, the noise each round really had, the
epsilon spent (:mod:`fedloom.privacy.aggregator` keeps it)."""


@dataclass(frozen=True)
class FederationState:
    """What the aggregator carries between rounds and checkpoints after each one, in one
    file: the strategy's state, and the privacy ledger (None without differential
    privacy). A strategy sees only its own part."""

    strategy: StrategyState
    ledger: PrivacyLedger | None = None

    @property
    def weights(self) -> Weights:
        """The global model."""
        return self.strategy.weights
