"""Messages between the simulation and its worker processes, without pickle.

A message is a JSON header followed by one raw buffer per tensor, each sent with
``Connection.send_bytes``: arrays go across as their bytes and come back through
``np.frombuffer``; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from fedloom.weights import Weights, dtype_from_name, dtype_name

Header = dict[str, Any]


def send(conn: Connection, header: Header, weights: Weights | None = None) -> None:
    tensors = None
    if weights is not None:
        tensors = [[k, dtype_name(v.dtype), list(v.shape)] for k, v in weights.items()]
    conn.send_bytes(json.dumps({**header, "tensors": tensors}).encode())
    if weights is not None:
        for array in weights.values():
            conn.send_bytes(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def receive(conn: Connection) -> tuple[Header, Weights | None]:
    header: Header = json.loads(conn.recv_bytes())
    tensors = header.pop("tensors", None)
    if tensors is None:
        return header, None
    weights: Weights = {}
    for name, dtype, shape in tensors:
        buf = conn.recv_bytes()
        weights[name] = np.frombuffer(buf, dtype=dtype_from_name(dtype)).reshape(shape)
    return header, weights
