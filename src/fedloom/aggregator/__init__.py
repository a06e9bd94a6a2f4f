"""The aggregator: the round loop, transport-agnostic (the same code runs simulated
and real), and the service methods transports call."""

from fedloom.aggregator.attempt import Attempt, withdrawn_reason
from fedloom.aggregator.config import FederationConfig, Signer, StepHandler
from fedloom.aggregator.loop import Aggregator

__all__ = [
    "Aggregator",
    "Attempt",
    "FederationConfig",
    "StepHandler",
    "Signer",
    "withdrawn_reason",
]
