"""Bytes moved through a transport, counted the same way by every transport."""

from __future__ import annotations

import threading


class TrafficCounter:
    """Bytes moved through a transport, both directions, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0  # aggregator -> sites
        self.received = 0  # sites -> aggregator

    def add(self, *, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.sent += sent
            self.received += received
