"""A site's side of the plan's privacy: what it does to its update before it leaves.

In order: clip to the DP bound (and note whether it was within it, for adaptive
clipping), add this site's share of the noise when the noise is distributed, then
encode and mask for secure aggregation. Every parameter comes from the site's own plan
(which its policy approved), except the clipping bound of the round under adaptive
clipping, which the aggregator announces (it scales the noise with it, so the privacy
guarantee does not depend on trusting it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedloom.core.errors import AggregationError, TaskError
from fedloom.core.records import Instruction, InstructionKind
from fedloom.core.weights import Weights
from fedloom.privacy import dp as dpmath
from fedloom.privacy.budget import SiteBudget
from fedloom.privacy.identity import SiteIdentity, simulated_identity
from fedloom.privacy.secagg import KEYS, STEPS, Exchange, SecureAggregationSite
from fedloom.privacy.settings import NoisePlacement, PrivacyPlan

if TYPE_CHECKING:
    from fedloom.plan import Plan

MetricFilter = Callable[[Mapping[str, float]], tuple[dict[str, float], tuple[str, ...]]]


@dataclass(frozen=True)
class Protected:
    """An update ready to leave: its tensors, the metrics that may leave, and the
    privacy parameters in force (for the audit log)."""

    tensors: Weights
    metrics: dict[str, float]
    privacy: dict[str, Any] = field(default_factory=dict)


class SitePrivacy:
    """Clip, noise, encode and mask one site's updates, as its plan says."""

    def __init__(
        self,
        site: str,
        plan: PrivacyPlan,
        *,
        per_round: int,
        max_samples: int,
        metric_filter: MetricFilter | None = None,
        budget: SiteBudget | None = None,
        roster: tuple[str, ...] | None = None,
        rng: np.random.Generator | None = None,
        identity: SiteIdentity | None = None,
        min_sites: int = 2,
    ) -> None:
        self.site = site
        self.plan = plan
        self.per_round = per_round
        self.max_samples = max_samples
        self._filter = metric_filter
        self._budget = budget
        self._rng = rng or dpmath.secret_generator()  # never the plan's seed
        sa = plan.secure_aggregation
        # secure aggregation signs this site's keys: with its certificate's key at a real
        # site, with a key from this process's simulated CA otherwise (protects nothing)
        self._secagg = (
            SecureAggregationSite(
                site,
                roster,
                identity=identity or simulated_identity(site),
                threshold=sa.threshold,
                neighbours=sa.neighbours,
                min_sites=min_sites,
            )
            if sa is not None
            else None
        )

    @property
    def exchange_steps(self) -> tuple[str, ...]:
        """The exchange steps this site's privacy takes itself (secure aggregation's: one
        its plan does not allow is refused with the reason by :meth:`prepare`)."""
        return STEPS

    def prepare(self, instruction: Instruction, exchange: Exchange) -> None:
        """Secure aggregation's key exchange, when the round asks for it."""
        if KEYS in instruction.exchange_steps:
            if self._secagg is None:
                raise AggregationError(
                    "the aggregator asks for secure aggregation, which this site's plan "
                    "does not have: the plans differ"
                )
            self._secagg.prepare(instruction.attempt_id, exchange)
        elif self._secagg is not None and instruction.kind is InstructionKind.TRAIN:
            raise AggregationError(
                "this site's plan requires secure aggregation, but the round does not "
                "ask for it: the update is not sent unmasked"
            )

    def protect(
        self,
        instruction: Instruction,
        delta: Weights,
        num_samples: int,
        metrics: Mapping[str, float],
    ) -> Protected:
        dp, sa = self.plan.dp, self.plan.secure_aggregation
        for name, array in delta.items():  # masked or clipped, NaN would hide in the sum
            if not np.all(np.isfinite(np.asarray(array, dtype=np.float64))):
                raise TaskError(
                    f"the update's tensor {name!r} holds NaN or infinite values: it is not "
                    "sent (check the learning rate and the data)"
                )
        record: dict[str, Any] = {}
        if self._budget is not None and dp is not None:  # before anything is computed or sent
            record["site_epsilon"] = self._budget.charge(instruction.round)
        tensors: Weights = dict(delta)
        if dp is not None:
            # the plan's bound; under adaptive clipping the one the aggregator announces
            # (it scales the noise with it, so the guarantee does not rest on it)
            announced = instruction.privacy.get("clip") if dp.adaptive_clip else None
            clip = float(announced or dp.clip)
            clipped, norm = dpmath.clip_update(delta, clip)
            record["dp"] = {
                "clip": clip,
                "norm": round(norm, 6),
                "noise_multiplier": dp.noise_multiplier,
                "noise": dp.noise.value,
                "delta": dp.delta,
                "accountant": self.plan.accountant.value,
            }
            if dp.noise is NoisePlacement.DISTRIBUTED:
                std = dp.noise_multiplier * clip / np.sqrt(self.per_round)
                clipped = dpmath.add_noise(clipped, float(std), self._rng)
                record["dp"]["noise_std_here"] = float(std)
            tensors = {k: clipped[k].astype(np.asarray(v).dtype) for k, v in delta.items()}
            if dp.adaptive_clip is not None:
                tensors[dpmath.UNCLIPPED] = np.array([1.0 if norm <= clip else 0.0])
        if sa is not None:
            clip_range = self.plan.clip_range(self.per_round)
            frac = self.plan.fractional_bits(self.per_round, self.max_samples)
            values = dict(tensors)
            if dpmath.UNCLIPPED in values:
                values[dpmath.UNCLIPPED] = values[dpmath.UNCLIPPED] * clip_range
            assert self._secagg is not None  # noqa: S101 - made with the plan's section
            tensors = self._secagg.mask(
                instruction.attempt_id,
                values,
                weight=self.plan.weight(num_samples, self.max_samples),
                clip_range=clip_range,
                frac=frac,
                bits=sa.bits,
            )
            record["secure_aggregation"] = {
                "bits": sa.bits,
                "fractional_bits": frac,
                "clip_range": clip_range,
                "threshold": sa.threshold,
                "neighbours": sa.neighbours,
            }
        kept, _ = self.filter_metrics(metrics)
        return Protected(tensors, kept, record)

    def filter_metrics(
        self, metrics: Mapping[str, float]
    ) -> tuple[dict[str, float], tuple[str, ...]]:
        return self._filter(metrics) if self._filter is not None else (dict(metrics), ())

    def complete(self, instruction: Instruction, exchange: Exchange) -> None:
        """Secure aggregation's unmasking, after the masked update was accepted."""
        if self._secagg is not None and KEYS in instruction.exchange_steps:
            self._secagg.unmask(instruction.attempt_id, exchange)


def site_privacy(
    plan: Plan,
    site: str,
    metric_filter: MetricFilter | None = None,
    budget: SiteBudget | None = None,
    identity: SiteIdentity | None = None,
) -> SitePrivacy | None:
    """A site's side of the plan's DP and secure aggregation (with its policy's metric
    filter, its own count of DP updates, and the identity it signs its secure-aggregation
    keys with: None in simulation); None when there is nothing to do."""
    privacy = plan.privacy
    if privacy.dp is None and privacy.secure_aggregation is None and metric_filter is None:
        return None
    return SitePrivacy(
        site,
        privacy,
        per_round=plan.per_round,
        max_samples=plan.training.max_samples,
        metric_filter=metric_filter,
        budget=budget,
        roster=plan.roster,
        identity=identity,
        min_sites=math.ceil(plan.per_round * plan.deadline.min_fraction - 1e-9),
    )
