"""Transports: how aggregator and collaborators talk (in-process here; gRPC later)."""

from fedloom.transport.base import AggregatorService, Connection
from fedloom.transport.inprocess import InProcessConnection, InProcessTransport, TrafficCounter
from fedloom.transport.messages import (
    Chunk,
    FailureReport,
    ModelHeader,
    ModelStream,
    PhaseMessage,
    Receipt,
    UpdateHeader,
    assemble,
    iter_chunks,
)

__all__ = [
    "AggregatorService",
    "Chunk",
    "Connection",
    "FailureReport",
    "InProcessConnection",
    "InProcessTransport",
    "ModelHeader",
    "ModelStream",
    "PhaseMessage",
    "Receipt",
    "TrafficCounter",
    "UpdateHeader",
    "assemble",
    "iter_chunks",
]
