"""The aggregator: the round loop, transport-agnostic (the same code runs simulated
and real), and the service methods transports call."""

from fedloom.aggregator.loop import (
    Aggregator,
    FederationConfig,
    PhaseHandler,
    Signer,
    withdrawn_reason,
)

__all__ = ["Aggregator", "FederationConfig", "PhaseHandler", "Signer", "withdrawn_reason"]
