"""The aggregator's side of the plan's privacy: budget, noise, clipping bound, masks.

:class:`AggregatorPrivacy` is what the round loop (:mod:`fedloom.aggregator`) asks
before, during and after each round. Its state (the clipping bound, the noise each round
really had, the epsilon spent) is the ledger of the federation state
(:class:`~fedloom.core.state.FederationState`), checkpointed with the strategy's state
after every round, so a resumed run continues the same budget. Epsilon is computed by
the plan's accountant (:mod:`fedloom.privacy.accounting`), and every figure says which.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography import x509

from fedloom.core.clock import Clock
from fedloom.core.records import MeanSummary
from fedloom.core.state import PrivacyLedger
from fedloom.core.weights import TensorSpec, Weights
from fedloom.privacy import dp as dpmath
from fedloom.privacy.accounting import label
from fedloom.privacy.secagg import ANNOUNCED, STEPS
from fedloom.privacy.secagg_server import SecAggParameters, SecAggRound
from fedloom.privacy.settings import NoisePlacement, PrivacyPlan

if TYPE_CHECKING:
    from fedloom.plan import Plan

_NARROW = frozenset({"float32", "float16", "bfloat16"})


class AggregatorPrivacy:
    """DP-FedAvg's noise and accountant, adaptive clipping and secure aggregation, as the
    plan asks; every method is cheap when its piece is off."""

    def __init__(
        self,
        plan: PrivacyPlan,
        *,
        per_round: int,
        max_samples: int,
        min_sites: int | None = None,
        rng: np.random.Generator | None = None,
        site_ca: x509.Certificate | None = None,
    ) -> None:
        self.plan = plan
        # the federation's CA: secure aggregation refuses keys a site's certificate from
        # it did not sign (None in simulation: only the name and the signature checked)
        self.site_ca = site_ca
        self.per_round = per_round
        # the fewest updates a round may aggregate (its quorum): under distributed noise
        # the least noise a round can end with
        self.min_sites = min(per_round, max(1, min_sites or per_round))
        self.max_samples = max_samples
        self.accountant = plan.accountant
        self._rng = rng or dpmath.secret_generator()  # never the plan's seed
        dp, sa = plan.dp, plan.secure_aggregation
        self._count_std = (
            dpmath.count_noise_std(per_round, dp.adaptive_clip.count_noise_multiplier)
            if dp is not None and dp.adaptive_clip is not None
            else None
        )
        self._update_z = (
            dpmath.update_noise_multiplier(dp.noise_multiplier, self._count_std)
            if dp is not None
            else 0.0
        )
        self.secagg = (
            SecAggParameters(
                bits=sa.bits,
                frac=plan.fractional_bits(per_round, max_samples),
                threshold=sa.threshold,
                neighbours=sa.neighbours,
                key_seconds=sa.key_seconds,
                clip_range=plan.clip_range(per_round),
            )
            if sa is not None
            else None
        )

    @property
    def exchange_steps(self) -> tuple[str, ...]:
        """The steps an instruction announces, before training."""
        return ANNOUNCED if self.secagg is not None else ()

    @property
    def attempt_steps(self) -> tuple[str, ...]:
        """Every step the attempts of this federation may take (each registered by the
        attempt's secure aggregation round, answered only while it is under way)."""
        return STEPS if self.secagg is not None else ()

    @property
    def adaptive(self) -> bool:
        return self._count_std is not None

    @property
    def update_multiplier(self) -> float:
        """Central noise: the updates' noise standard deviation on the sum over ``clip``
        (the plan's multiplier, less the count's share under adaptive clipping)."""
        return self._update_z

    @property
    def count_std(self) -> float | None:
        """Adaptive clipping: the standard deviation of the noise on the count of
        unclipped updates (whose sensitivity is :data:`dp.COUNT_SENSITIVITY`)."""
        return self._count_std

    # ----------------------------------------------------------- before a round

    def ledger(self, kept: PrivacyLedger | None) -> dict[str, Any]:
        """The ledger ``kept`` (clip bound, noise per round, epsilon), or the one before
        round 1."""
        if kept is not None:
            return dict(kept)
        dp = self.plan.dp
        return {"clip": dp.clip if dp else None, "noise": [], "epsilon": 0.0}

    def stop_reason(self, kept: PrivacyLedger | None) -> str | None:
        """Why the next round must not run: it would spend more than the budget."""
        dp = self.plan.dp
        if dp is None or dp.epsilon_budget is None:
            return None
        ledger = self.ledger(kept)
        spent = list(ledger["noise"])
        after = dpmath.epsilon([*spent, self._worst_noise()], dp.delta, self.accountant)
        if after <= dp.epsilon_budget:
            return None
        return (
            f"privacy budget: another round would bring epsilon from {ledger['epsilon']:.3g} "
            f"to {after:.3g}, over the plan's epsilon_budget {dp.epsilon_budget:g} "
            f"(delta {dp.delta:g}, {label(self.accountant)} accountant); training stopped "
            f"after {len(spent)} round(s)"
        )

    def spent(self, kept: PrivacyLedger | None) -> dict[str, Any] | None:
        """The epsilon spent so far (at the plan's delta) and the next clipping bound,
        for ``fedloom status``; None without DP."""
        dp = self.plan.dp
        if dp is None:
            return None
        ledger = self.ledger(kept)
        return {
            "epsilon": float(ledger["epsilon"]),
            "delta": dp.delta,
            "accountant": self.accountant.value,
            "epsilon_budget": dp.epsilon_budget,
            "rounds": len(ledger["noise"]),
            "clip": ledger["clip"],
        }

    def _worst_noise(self) -> float:
        """The least noise the next round can have: all of it under central noise; under
        distributed noise, the shares of a round closing with its quorum only."""
        dp = self.plan.dp
        assert dp is not None  # noqa: S101 - only asked under DP
        if dp.noise is NoisePlacement.CENTRAL:
            return dp.noise_multiplier
        return dp.noise_multiplier * math.sqrt(self.min_sites / self.per_round)

    def instruction(self, kept: PrivacyLedger | None) -> dict[str, Any]:
        """What every site needs this round beyond its plan: the clipping bound now."""
        if self.plan.dp is None:
            return {}
        ledger = self.ledger(kept)
        return {"clip": ledger["clip"], "epsilon": ledger["epsilon"]}

    def weight(self, num_samples: int) -> int:
        """A site's weight in the mean: 1 under DP (every site alike), else its capped
        sample count."""
        return self.plan.weight(num_samples, self.max_samples)

    def upload_specs(self, model: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        """What an update must announce: the model's tensors, plus the unclipped bit under
        adaptive clipping (secure aggregation turns each into unsigned integers:
        :attr:`SecAggRound.specs`)."""
        specs = model + ((TensorSpec(dpmath.UNCLIPPED, "float64", (1,)),) if self.adaptive else ())
        return specs

    def open_secagg(
        self,
        *,
        attempt_id: str,
        round: int,
        selected: tuple[str, ...],
        model: tuple[TensorSpec, ...],
        clock: Clock,
        cond: threading.Condition,
        in_round: Callable[[], Iterable[str]],
        drop: Callable[[str, str], None],
        spool_dir: Path | None,
    ) -> SecAggRound | None:
        if self.secagg is None:
            return None
        return SecAggRound(
            attempt_id=attempt_id,
            round=round,
            selected=selected,
            specs=self.upload_specs(model),
            params=self.secagg,
            clock=clock,
            cond=cond,
            in_round=in_round,
            drop=drop,
            spool_dir=spool_dir,
            site_ca=self.site_ca,
        )

    # ------------------------------------------------------------ after a round

    def unmasked_summary(
        self,
        round: int,
        secagg: SecAggRound,
        model: tuple[TensorSpec, ...],
        results: tuple[Any, ...],
        deadline: float,
    ) -> MeanSummary:
        """The round's mean from the unmasked sum (raises AggregationError if the masks
        could not be removed)."""
        weights = secagg.accumulator.weights
        sums = secagg.unmask(weights, deadline)
        total = float(sum(weights.values()))
        specs = self.upload_specs(model)
        mean: Weights = {}
        for spec, flat in zip(specs, sums, strict=True):
            value = flat / total
            if spec.name == dpmath.UNCLIPPED:
                value = value / self.plan.clip_range(self.per_round)  # sent as bit * range
            if spec.dtype in _NARROW:
                value = value.astype(np.float32)
            mean[spec.name] = value.reshape(spec.shape)
        return MeanSummary(round, mean, total, results)

    def finish(
        self, summary: MeanSummary, kept: PrivacyLedger | None
    ) -> tuple[MeanSummary, dict[str, Any] | None]:
        """The summary the strategy may see (noised, extras removed), and the privacy
        ledger after this round (None when DP is off)."""
        dp = self.plan.dp
        mean = dict(summary.mean_delta)
        unclipped = mean.pop(dpmath.UNCLIPPED, None)
        if dp is None:
            return MeanSummary(summary.round, mean, summary.total_weight, summary.results), None
        ledger = self.ledger(kept)
        m = len(summary.results)
        clip = float(ledger["clip"])
        if m == 0:
            return MeanSummary(summary.round, mean, summary.total_weight, summary.results), ledger
        if dp.noise is NoisePlacement.CENTRAL:
            noised = dpmath.add_noise(mean, self._update_z * clip / m, self._rng)
            spent = self._update_z
        else:  # the sites added theirs: m of per_round shares arrived
            noised = {k: np.asarray(v, dtype=np.float64) for k, v in mean.items()}
            spent = dp.noise_multiplier * math.sqrt(m / self.per_round)
        out = {
            k: v.astype(np.float32) if np.asarray(mean[k]).dtype == np.float32 else v
            for k, v in noised.items()
        }
        if unclipped is not None and dp.adaptive_clip is not None and self._count_std:
            fraction = float(np.asarray(unclipped).reshape(-1)[0])
            fraction += float(self._rng.normal(0.0, self._count_std)) / m
            # two Gaussian mechanisms released: what they compose to (the plan's z)
            spent = dpmath.round_noise_multiplier(spent, self._count_std)
            clip = dpmath.next_clip(
                clip,
                fraction,
                target=dp.adaptive_clip.target_quantile,
                lr=dp.adaptive_clip.learning_rate,
            )
        history = [*ledger["noise"], spent]
        new_ledger = {
            "clip": clip,  # the bound of the next round
            "noise": history,  # the noise multiplier each round really had
            "clips": [*ledger.get("clips", []), float(ledger["clip"])],  # the bound it used
            "epsilon": dpmath.epsilon(history, dp.delta, self.accountant),
        }
        return MeanSummary(summary.round, out, summary.total_weight, summary.results), new_ledger


def spent_after(
    ledger: dict[str, Any], privacy: AggregatorPrivacy | None
) -> dict[str, float | str]:
    """What a round's record says once it was aggregated: the epsilon spent so far at
    the plan's delta and the accountant that computed it, the round's noise multiplier
    and the clipping bound it used."""
    dp = privacy.plan.dp if privacy is not None else None
    out: dict[str, float | str] = {"epsilon": float(ledger["epsilon"])}
    if dp is not None and privacy is not None:
        out["delta"] = dp.delta
        out["accountant"] = privacy.accountant.value
        out["noise_multiplier"] = float(ledger["noise"][-1]) if ledger["noise"] else 0.0
    clips = ledger.get("clips") or [ledger["clip"]]
    out["clip"] = float(clips[-1])
    return out


def spent_by_round(
    kept: PrivacyLedger | None, privacy: AggregatorPrivacy
) -> list[dict[str, float | str]]:
    """What each finished training round had spent once aggregated, in order, as
    :func:`spent_after` said it then: recomputed from the ledger."""
    dp = privacy.plan.dp
    if dp is None:
        return []
    ledger = privacy.ledger(kept)
    noise = [float(z) for z in ledger["noise"]]
    clips = [float(c) for c in ledger.get("clips", [])]
    return [
        {
            "epsilon": dpmath.epsilon(noise[: k + 1], dp.delta, privacy.accountant),
            "delta": dp.delta,
            "accountant": privacy.accountant.value,
            "noise_multiplier": z,
            **({"clip": clips[k]} if k < len(clips) else {}),
        }
        for k, z in enumerate(noise)
    ]


def aggregator_privacy(
    plan: Plan, site_ca: x509.Certificate | None = None
) -> AggregatorPrivacy | None:
    """The aggregator's side of the plan's DP and secure aggregation (``site_ca``: the
    federation's CA, which sites' certificates must chain to); None without them."""
    privacy = plan.privacy
    if privacy.dp is None and privacy.secure_aggregation is None:
        return None
    return AggregatorPrivacy(
        privacy,
        per_round=plan.per_round,
        max_samples=plan.training.max_samples,
        min_sites=math.ceil(plan.per_round * plan.deadline.min_fraction - 1e-9),
        site_ca=site_ca,
    )
