"""User-level differential privacy (DP-FedAvg): the maths, as pure functions.

A site clips its update ``delta`` to the L2 bound ``clip`` (over every tensor together).
The sum of ``m`` clipped updates then changes by at most ``clip`` when one site joins or
leaves (its update is added or zeroed: the add/remove neighbouring relation the
accountant uses; replacing a site's data moves it by up to ``2 * clip``), so Gaussian
noise of standard deviation ``noise_multiplier * clip`` on the sum is the Gaussian
mechanism, and the round costs what one such mechanism costs. Every site weighs the
same in the mean (a weight per sample count would let one site's share of the sum
exceed ``clip``).

Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with Adaptive
Clipping"): each site also reports whether its update was within the bound; the
aggregator noises the count, and moves the bound geometrically towards the target
quantile: ``clip *= exp(-lr * (unclipped_fraction - target))``. The count's noise
``count_std`` takes part of the privacy: the update's noise multiplier becomes
``(z**-2 - (2 * count_std)**-2) ** -0.5`` so that the pair costs what a Gaussian
mechanism of multiplier ``z`` costs.

Randomness for noise never comes from the plan's seed: :func:`secret_generator` draws
its seed from the operating system, so nobody holding the plan can predict it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np

from fedloom.weights import Weights

UNCLIPPED = "fedloom.unclipped"  # the extra tensor holding a site's "within the bound" bit


def secret_generator() -> np.random.Generator:
    """A generator seeded from the operating system's secret randomness."""
    return np.random.default_rng(secrets.randbits(128))


def l2_norm(weights: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of every value of ``weights`` together (float64)."""
    total = 0.0
    for array in weights.values():
        flat = np.asarray(array, dtype=np.float64).reshape(-1)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_update(delta: Mapping[str, np.ndarray], clip: float) -> tuple[Weights, float]:
    """``delta`` scaled down to L2 norm at most ``clip`` (float64), and its norm before."""
    norm = l2_norm(delta)
    scale = 1.0 if norm <= clip or norm == 0 else clip / norm
    clipped = {k: np.asarray(v, dtype=np.float64) * scale for k, v in delta.items()}
    return clipped, norm


def add_noise(weights: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Weights:
    """``weights`` plus independent Gaussian noise of standard deviation ``std`` on every
    value (float64 out)."""
    return {
        k: np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(v))
        for k, v in weights.items()
    }


def update_noise_multiplier(noise_multiplier: float, count_std: float | None) -> float:
    """The noise multiplier left for the updates once the unclipped count takes
    ``count_std`` (Andrew et al., Theorem 1); ``noise_multiplier`` without adaptive
    clipping. Raises ValueError when ``count_std`` is too small to leave any."""
    if count_std is None or noise_multiplier == 0:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2 * count_std) ** -2
    if rest <= 0:
        raise ValueError(
            f"the count noise {count_std:g} must exceed half the noise multiplier "
            f"({noise_multiplier / 2:g}) to leave noise for the updates"
        )
    return float(rest**-0.5)


def count_noise_std(sites: int, count_noise_multiplier: float | None) -> float:
    """The standard deviation of the noise on the count of unclipped updates: the
    plan's value, or ``sites / 20`` (Andrew et al.'s choice)."""
    return count_noise_multiplier if count_noise_multiplier is not None else sites / 20


def next_clip(clip: float, unclipped_fraction: float, *, target: float, lr: float) -> float:
    """The geometric update of the clipping bound towards the ``target`` quantile."""
    return float(clip * math.exp(-lr * (unclipped_fraction - target)))


def epsilon(noise_multipliers: Iterable[float], delta: float) -> float:
    """The epsilon at ``delta`` of the Gaussian mechanisms of ``noise_multipliers``
    composed (RDP accountant of the ``dp-accounting`` package). No amplification by
    sampling is claimed: which sites take part in a round is derived from the plan's
    seed, which is no secret. A multiplier of 0 is no privacy at all: infinity."""
    from dp_accounting import dp_event, rdp

    counts: dict[float, int] = {}
    for z in noise_multipliers:
        counts[float(z)] = counts.get(float(z), 0) + 1
    if not counts:
        return 0.0
    if any(z <= 0 for z in counts):
        return math.inf
    accountant = rdp.RdpAccountant()
    for z, n in sorted(counts.items()):
        accountant.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), n))
    return float(accountant.get_epsilon(delta))
