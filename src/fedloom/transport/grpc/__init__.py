"""The gRPC transport: mutual TLS, streaming chunks, identity from the certificate.

The only package of fedloom that imports ``grpc``.
"""

from fedloom.transport.grpc.client import (
    AggregatorLost,
    ClientSettings,
    GrpcConnection,
    backoff_delay,
)
from fedloom.transport.grpc.server import GrpcServer, ServerSettings, SiteSession
from fedloom.transport.grpc.wire import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "AggregatorLost",
    "ClientSettings",
    "GrpcConnection",
    "GrpcServer",
    "ServerSettings",
    "SiteSession",
    "backoff_delay",
]
