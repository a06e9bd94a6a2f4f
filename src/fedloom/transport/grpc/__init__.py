"""The gRPC transport: mutual TLS, streaming chunks, identity from the certificate.

The only package of fedloom that imports ``grpc``.
"""

from fedloom.transport.grpc.client import ClientSettings, GrpcConnection
from fedloom.transport.grpc.gatekeeper import ServerSettings
from fedloom.transport.grpc.server import GrpcServer

__all__ = [
    "ClientSettings",
    "GrpcConnection",
    "GrpcServer",
    "ServerSettings",
]
