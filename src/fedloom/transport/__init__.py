"""Transports: how aggregator and collaborators talk: in-process here, gRPC in
:mod:`fedloom.transport.grpc` (the one package that imports grpc)."""

from fedloom.transport.base import AggregatorService, Connection
from fedloom.transport.inprocess import InProcessConnection, InProcessTransport
from fedloom.transport.messages import (
    Chunk,
    ExchangeMessage,
    FailureReport,
    Heartbeat,
    HeartbeatReply,
    Hello,
    ModelHeader,
    ModelStream,
    StreamEnd,
    UpdateHeader,
    UploadReceipt,
    Welcome,
    assemble,
    iter_chunks,
)
from fedloom.transport.traffic import TrafficCounter

__all__ = [
    "AggregatorService",
    "Chunk",
    "Connection",
    "FailureReport",
    "Heartbeat",
    "HeartbeatReply",
    "Hello",
    "InProcessConnection",
    "InProcessTransport",
    "ModelHeader",
    "ModelStream",
    "ExchangeMessage",
    "UploadReceipt",
    "StreamEnd",
    "TrafficCounter",
    "UpdateHeader",
    "Welcome",
    "assemble",
    "iter_chunks",
]
