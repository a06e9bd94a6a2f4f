"""Error feedback: what topk did not send is carried into the site's next update.

A site adds its residual to its update (:func:`carry`), sends the topk of the sum, and
keeps what was not sent as its new residual (:func:`remainder`). Over any number of
rounds, what was sent plus the residual left is exactly the sum of the updates (Stich et
al., 2018; Karimireddy et al., 2019): nothing is lost, only delayed.

The residuals are kept in float64 by :class:`ErrorFeedback`, one per site, in memory
only: a collaborator that restarts starts again from none (they are never written to
disk: what a site keeps is its own business, and no pickle is ever written). A new
residual is held back until the aggregator accepted the update it belongs to; an update
that was refused leaves the residual as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from fedloom.core.weights import Weights, is_float


def carry(update: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray]) -> Weights:
    """``update + residual`` in float64 for the float tensors (a residual of another shape,
    from another model, is ignored); other tensors as they are."""
    out: Weights = {}
    for name, array in update.items():
        values = np.asarray(array)
        if not is_float(values.dtype):
            out[name] = values
            continue
        total = values.astype(np.float64)
        kept = residual.get(name)
        if kept is not None and kept.shape == total.shape:
            total += kept
        out[name] = total
    return out


def remainder(carried: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> Weights:
    """What was not sent: ``carried - sent`` in float64, for the float tensors."""
    return {
        name: np.asarray(values, dtype=np.float64) - np.asarray(sent[name], dtype=np.float64)
        for name, values in carried.items()
        if is_float(np.asarray(values).dtype)
    }


class ErrorFeedback:
    """Each site's residual, in memory. Thread-safe: one object may serve every site of
    a simulation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._residuals: dict[str, Weights] = {}
        self._held: dict[str, tuple[int, Weights]] = {}  # site -> (round, new residual)

    def residual(self, site: str) -> Weights:
        """``site``'s residual (empty before its first accepted update)."""
        with self._lock:
            return dict(self._residuals.get(site, {}))

    def hold(self, site: str, round: int, residual: Weights) -> None:
        """The residual after ``site``'s update of ``round``, kept aside until
        :meth:`settle` says whether the aggregator accepted that update."""
        with self._lock:
            self._held[site] = (round, residual)

    def settle(self, site: str, round: int, accepted: bool) -> None:
        """Make the held residual of ``round`` ``site``'s residual if its update was
        accepted; drop it otherwise."""
        with self._lock:
            held = self._held.pop(site, None)
            if held is not None and held[0] == round and accepted:
                self._residuals[site] = held[1]

    def norm(self, site: str) -> float:
        """The L2 norm of ``site``'s residual (0 without one)."""
        with self._lock:
            kept = self._residuals.get(site, {})
            return float(np.sqrt(sum(float(np.vdot(v, v)) for v in kept.values())))
