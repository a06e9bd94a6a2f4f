"""A site's side of the plan's compression: it encodes each update before it leaves
(after the privacy step, so the audit log records what really left) and decodes the
global model it downloads.

topk's error feedback lives in an :class:`~fedloom.compression.feedback.ErrorFeedback`
keyed by site, in memory for as long as the object lives: a real collaborator keeps it
for its process's lifetime (a restart drops the residual: that site's next update
starts afresh, nothing else changes), a simulation keeps one for all its sites.
int8's stochastic rounding draws from the plan's seed, keyed by round and site, so a
simulation is reproducible; it is not privacy noise (lossy codecs and DP are not mixed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedloom.compression.codecs import (
    Codec,
    Compression,
    ModelCodec,
    decode,
    decode_model,
    encode,
)
from fedloom.compression.feedback import ErrorFeedback, carry, remainder
from fedloom.core.rng import generator
from fedloom.core.weights import Weights, specs_of

if TYPE_CHECKING:
    from fedloom.plan import Plan

PURPOSE = "compression"


class SiteCompression:
    """Encode updates and decode global models as ``settings`` says, for any site."""

    def __init__(
        self, settings: Compression, *, seed: int, feedback: ErrorFeedback | None = None
    ) -> None:
        self.settings = settings
        self.seed = seed
        self.feedback = feedback if feedback is not None else ErrorFeedback()

    def encode(
        self, site: str, round: int, update: Mapping[str, np.ndarray]
    ) -> tuple[Weights, dict[str, Any]]:
        """``site``'s update of ``round`` as it travels, and the parameters in force (for
        the audit log). Under topk the site's residual is added first, and the new one
        held until :meth:`settle`."""
        settings = self.settings
        if settings.update is Codec.NONE:
            return dict(update), {}
        rng = generator(self.seed, round, site, PURPOSE)
        specs = specs_of(update)
        if settings.update is not Codec.TOPK:
            return encode(update, settings, rng=rng), settings.parameters()
        carried = carry(update, self.feedback.residual(site))
        encoded = encode(carried, settings, rng=rng, specs=specs)
        residual = remainder(carried, decode(encoded, specs, settings))
        self.feedback.hold(site, round, residual)
        return encoded, settings.parameters()

    def settle(self, site: str, round: int, accepted: bool) -> None:
        """The aggregator answered ``site``'s update of ``round``: keep the residual it
        left if it was accepted."""
        if self.settings.update is Codec.TOPK:
            self.feedback.settle(site, round, accepted)

    def decode_model(self, weights: Mapping[str, np.ndarray]) -> Weights:
        """The global model from what was downloaded."""
        if self.settings.model is ModelCodec.NONE:
            return dict(weights)
        return decode_model(weights, self.settings.model)


def site_compression(plan: Plan) -> SiteCompression | None:
    """The sites' side of the plan's compression; None when it has none."""
    settings = plan.compression.settings()
    if not settings.active:
        return None
    return SiteCompression(settings, seed=plan.seed)
