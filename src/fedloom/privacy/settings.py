"""The plan's ``privacy`` section: what the AI developer asks for.

Three independent pieces, each off unless its section is present:

- ``dp``: user-level differential privacy (DP-FedAvg). Every site clips its update to an
  L2 norm bound; Gaussian noise calibrated to the bound and the noise multiplier is added
  to the sum of the updates, by the aggregator (``noise: central``) or in shares by the
  sites under secure aggregation (``noise: distributed``).
- ``secure_aggregation``: SecAgg+ style masking; the aggregator learns only the sum.
- ``dp_sgd``: sample-level DP-SGD inside each site's training (torch tasks, Opacus).

``accountant`` (``rdp``, the default, or ``pld``) turns the noise of both DP pieces into
epsilon, at the aggregator and at every site (:mod:`fedloom.privacy.accounting`).

The data owner's policy (:mod:`fedloom.privacy.policy`) checks these values at the site
before any data is read. The cross-field rules (robust strategies and secure
aggregation, distributed noise without secure aggregation …) live in
:func:`privacy_problems`, which the plan's validation calls.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from fedloom.core.frozen import Frozen
from fedloom.core.records import Accountant
from fedloom.privacy.quantize import fractional_bits, range_problem

Probability = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
# caps (docs/plan.md): far beyond any sensible setting, well inside what the arithmetic
# and the clocks handle
Multiplier = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
Bound = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]
Seconds = Annotated[float, Field(gt=0, le=604_800, allow_inf_nan=False)]  # a week


class NoisePlacement(enum.Enum):
    CENTRAL = "central"  # the aggregator adds the noise to the sum it unmasked or folded
    DISTRIBUTED = "distributed"  # each site adds a share, hidden by secure aggregation


class AdaptiveClipPlan(Frozen):
    """Adaptive clipping (Andrew et al., 2021): the bound follows a quantile of the
    updates' norms, estimated privately from one noised bit per site."""

    target_quantile: Probability = 0.5
    learning_rate: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.2
    # the standard deviation of the noise on the count of unclipped updates (whose
    # sensitivity is 1: its multiplier too); None: sites / 20, the paper's choice
    # (sigma_b = m / 20). Must exceed dp.noise_multiplier
    count_noise_multiplier: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] | None = (
        None
    )


class DPPlan(Frozen):
    """User-level DP-FedAvg (McMahan et al., 2018)."""

    noise_multiplier: Multiplier = 1.0
    clip: Bound = 1.0  # L2 norm bound of one site's update (the start, when adaptive)
    adaptive_clip: AdaptiveClipPlan | None = None
    delta: Probability = 1e-5
    epsilon_budget: Bound | None = None  # stop before a round would spend more
    noise: NoisePlacement = NoisePlacement.CENTRAL


class SecureAggregationPlan(Frozen):
    """Secure aggregation in the spirit of SecAgg+ (Bell et al., 2020)."""

    bits: Literal[32, 64] = 32  # the ring of the masked fixed-point values: 2**bits
    # fraction of a round's sites whose shares unmask the sum (more than half)
    threshold: Annotated[float, Field(gt=0.5, le=1, allow_inf_nan=False)] = 2 / 3
    # masks are agreed with this many other sites (a Harary graph); None: with every site
    neighbours: Annotated[int, Field(ge=2, le=10_000, strict=True)] | None = None
    # each coordinate of an update is clipped to [-clip_range, clip_range] before it is
    # encoded; None: dp.clip when dp is on, else 1.0
    clip_range: Bound | None = None
    key_seconds: Seconds = 60.0  # how long the key exchange waits for the round's sites


class DPSGDPlan(Frozen):
    """Sample-level DP-SGD in each site's training (Abadi et al., 2016), through Opacus."""

    noise_multiplier: Multiplier = 1.0
    max_grad_norm: Bound = 1.0
    delta: Probability = 1e-5


class PrivacyPlan(Frozen):
    dp: DPPlan | None = None
    secure_aggregation: SecureAggregationPlan | None = None
    dp_sgd: DPSGDPlan | None = None
    # how noise becomes epsilon, for DP-FedAvg and DP-SGD alike. RDP stays the default so
    # that a plan written before the choice keeps its hash and its epsilons
    accountant: Accountant = Accountant.RDP

    @field_validator("secure_aggregation", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        """``secure_aggregation: true`` means the defaults, ``false`` means off."""
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @property
    def enabled(self) -> bool:
        return any(p is not None for p in (self.dp, self.secure_aggregation, self.dp_sgd))

    def weight(self, num_samples: int, max_samples: int) -> int:
        """A site's weight in the mean: 1 under DP (every site alike: a weight per sample
        would let one site's share of the sum exceed the clip), else its sample count
        capped by the plan's ``training.max_samples``."""
        return 1 if self.dp is not None else min(int(num_samples), max_samples)

    def fractional_bits(self, per_round: int, max_samples: int) -> int:
        """The fixed-point precision of secure aggregation's encoding for this plan."""
        sa = self.secure_aggregation
        assert sa is not None  # noqa: S101 - asked only under secure aggregation
        biggest = self.weight(max_samples, max_samples)
        return fractional_bits(sa.bits, per_round, biggest, self.clip_range(per_round))

    def clip_range(self, per_round: int) -> float:
        """The per-coordinate range secure aggregation encodes: the plan's, else the DP
        bound, widened under distributed noise so that a site's noise share (standard
        deviation ``z * clip / sqrt(per_round)``) is clipped only beyond 6 deviations;
        1.0 without DP."""
        sa, dp = self.secure_aggregation, self.dp
        if sa is not None and sa.clip_range is not None:
            return sa.clip_range
        if dp is None:
            return 1.0
        return dp.clip + distributed_margin(dp, per_round)


def distributed_margin(dp: DPPlan, per_round: int) -> float:
    """Room for a site's share of distributed noise in the encoding: 6 of its standard
    deviations (0 under central noise)."""
    if dp.noise is not NoisePlacement.DISTRIBUTED:
        return 0.0
    return 6 * dp.noise_multiplier * dp.clip / math.sqrt(max(1, per_round))


def privacy_problems(
    privacy: PrivacyPlan, *, strategy: str, needs_updates: bool, per_round: int, max_samples: int
) -> list[str]:
    """What is wrong with ``privacy`` together with the rest of the plan."""
    problems: list[str] = []
    dp, sa = privacy.dp, privacy.secure_aggregation
    if sa is not None and needs_updates:
        problems.append(
            f"privacy.secure_aggregation: strategy {strategy!r} needs each site's update, "
            "which secure aggregation hides from the aggregator; choose a mean-based "
            "strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad) or turn "
            "secure aggregation off"
        )
    if dp is not None and needs_updates:
        problems.append(
            f"privacy.dp: strategy {strategy!r} combines individual updates, and DP-FedAvg's "
            "noise is calibrated to a sum; choose a mean-based strategy or remove privacy.dp"
        )
    if strategy == "scaffold" and (dp is not None or privacy.dp_sgd is not None):
        key = "dp" if dp is not None else "dp_sgd"
        problems.append(
            f"privacy.{key}: scaffold's control variates are computed from each site's "
            "unclipped, un-noised local steps and sent with its update, which the "
            f"privacy.{key} guarantee does not cover; use fedavg, fedprox or fednova with DP"
        )
    if dp is not None and dp.noise is NoisePlacement.DISTRIBUTED and sa is None:
        problems.append(
            "privacy.dp.noise: distributed noise is hidden only by secure aggregation (each "
            "site's share alone is too small to protect it); add privacy.secure_aggregation "
            "or use noise: central"
        )
    if dp is not None and dp.adaptive_clip is not None:
        if dp.noise is NoisePlacement.DISTRIBUTED:
            problems.append(
                "privacy.dp.adaptive_clip: adaptive clipping works with noise: central only "
                "(the count of unclipped updates is noised by the aggregator); use a fixed "
                "clip with distributed noise"
            )
        count = dp.adaptive_clip.count_noise_multiplier
        count_std = count if count is not None else per_round / 20
        if dp.noise_multiplier >= count_std:
            source = "" if count is not None else f", the default: {per_round} sites / 20"
            problems.append(
                "privacy.dp.adaptive_clip.count_noise_multiplier: the noise on the count of "
                f"unclipped updates ({count_std:g}{source}) must exceed the noise multiplier "
                f"({dp.noise_multiplier:g}): one site moves the count by 1, and the count's "
                "noise and the updates' share the noise multiplier's budget, so no noise "
                f"would be left for the updates; set it above {dp.noise_multiplier:g} "
                f"(e.g. {2 * dp.noise_multiplier:g}, which gives the updates a multiplier "
                f"of {dp.noise_multiplier * 2 / math.sqrt(3):.3g})"
            )
    distributed = dp is not None and dp.noise is NoisePlacement.DISTRIBUTED
    if sa is not None and dp is not None and distributed and sa.clip_range is not None:
        room = dp.clip + distributed_margin(dp, per_round)
        if sa.clip_range < room:  # clipped noise is no longer Gaussian: the accounting fails
            problems.append(
                f"privacy.secure_aggregation.clip_range: {sa.clip_range:g} would clip the "
                "sites' shares of distributed noise (the accountant assumes Gaussian noise); "
                f"set it to at least {room:.3g} (dp.clip plus 6 standard deviations of a "
                "share), or leave it out"
            )
    if sa is not None:
        if per_round < 2:
            problems.append(
                "privacy.secure_aggregation: a round needs at least 2 sites to hide one "
                f"site's update in a sum (sites per round: {per_round})"
            )
        elif sa.neighbours is not None and sa.neighbours >= per_round:
            problems.append(
                f"privacy.secure_aggregation.neighbours: must be below the sites per round, "
                f"{per_round} (got {sa.neighbours}); leave it out to mask with every site"
            )
        biggest = privacy.weight(max_samples, max_samples)
        problem = range_problem(sa.bits, per_round, biggest, privacy.clip_range(per_round))
        if problem is not None:
            problems.append(problem)
    return problems
