"""What both ends of the gRPC transport agree on: names, version, channel options."""

from __future__ import annotations

PROTOCOL_VERSION = (
    6  # 6: one vocabulary (GetInstruction, attempt_id, ExchangeMessage), typed ending
)
SERVICE = "fedloom.v1.Aggregator"
SESSION_HEADER = "fedloom-session"
"""Metadata key of the session id a collaborator process sends with every call: the
aggregator keeps one live session per site, the process that said Hello last."""
REFUSAL_HEADER = "fedloom-refusal"
"""Trailing metadata key of why the aggregator refused a call, where the collaborator acts
on it (not only shows it): one of :data:`NO_SESSION` …"""
NO_SESSION = "no-session"
"""The call came from no live session (the aggregator restarted, or the site never said
Hello): the collaborator says Hello again and repeats the call."""
METHODS = (
    "Hello",
    "GetInstruction",
    "Download",
    "Upload",
    "ReportFailure",
    "Exchange",
    "Heartbeat",
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Per message; tensors travel in chunks of a few MiB, so no model comes near it."""

MAX_CONTROL_BYTES = 1024 * 1024
"""Per message that carries no tensors (Hello, GetInstruction, Download's request,
ReportFailure, Heartbeat): the aggregator refuses a larger one before decoding it."""

MAX_HEADER_BYTES = 8 * 1024 * 1024
"""An upload's header (its tensor specs and metrics): room for tens of thousands of
tensors, not for a flood of metrics."""

MAX_EXCHANGE_BYTES = 16 * 1024 * 1024
"""One step of a multi-step round (secure aggregation's keys and shares)."""

KEEPALIVE_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),  # a second aggregator on the same port is refused
    ]


def channel_options(server_name: str | None = None) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),  # fedloom retries itself, knowing what is safe to repeat
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options
