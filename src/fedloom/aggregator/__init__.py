"""The aggregator: the round loop, transport-agnostic (the same code runs simulated
and real), and the service methods transports call."""

from fedloom.aggregator.attempt import Attempt, withdrawn_reason
from fedloom.aggregator.config import FederationConfig, PhaseHandler, Signer
from fedloom.aggregator.loop import Aggregator

__all__ = [
    "Aggregator",
    "Attempt",
    "FederationConfig",
    "PhaseHandler",
    "Signer",
    "withdrawn_reason",
]
