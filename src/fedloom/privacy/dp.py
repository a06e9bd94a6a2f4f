"""User-level differential privacy (DP-FedAvg): the maths, as pure functions.

The neighbouring relation (docs/privacy.md, "What the guarantee says"): which sites take
part in each round is public; two federations are neighbours when one site's update is
replaced by zero in every round it takes part in (its data could have taught the model
nothing). A site clips its update ``delta`` to the L2 bound ``clip`` (over every tensor
together), so the sum of ``m`` clipped updates moves by at most ``clip`` between
neighbours, and Gaussian noise of standard deviation ``noise_multiplier * clip`` on the
sum is the Gaussian mechanism of that multiplier. Every site weighs the same in the mean
(a weight per sample count would let one site's share of the sum exceed ``clip``).

Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with Adaptive
Clipping"): each site also reports one bit, whether its update was within the bound; the
aggregator noises the count of those bits, and moves the bound geometrically towards the
target quantile: ``clip *= exp(-lr * (unclipped_fraction - target))``. Under the relation
above one site's bit can flip (its real update may exceed the bound, the zero update
never does), so the count moves by up to :data:`COUNT_SENSITIVITY` = 1, not by the 1/2
of the paper's centred bits under add/remove. The round releases two Gaussian mechanisms,
of multipliers ``z_u`` (the updates: noise ``z_u * clip`` over sensitivity ``clip``) and
``count_std / 1`` (the count), which compose exactly to one of multiplier
``(z_u^-2 + count_std^-2)^-1/2`` (:func:`round_noise_multiplier`). So the updates get
``z_u = (z^-2 - count_std^-2)^-1/2`` (:func:`update_noise_multiplier`), and the pair
costs what one Gaussian mechanism of the plan's multiplier ``z`` costs.

Randomness for noise never comes from the plan's seed: :func:`secret_generator` draws
its seed from the operating system, so nobody holding the plan can predict it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np

from fedloom.core.records import Accountant
from fedloom.core.weights import Weights
from fedloom.privacy.accounting import combined_multiplier, gaussian_epsilon

UNCLIPPED = "fedloom.unclipped"  # the extra tensor holding a site's "within the bound" bit
# how far one site moves the count of unclipped updates between neighbours: its bit can
# flip (participation is public, and the zero update is always within the bound)
COUNT_SENSITIVITY = 1.0


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
    """The noise multiplier left for the updates once the count of unclipped updates
    takes its share: ``(z^-2 - (count_std / COUNT_SENSITIVITY)^-2)^-1/2``, so that the
    pair composes to exactly ``noise_multiplier`` (:func:`round_noise_multiplier`);
    ``noise_multiplier`` without adaptive clipping. Raises ValueError when ``count_std``
    is too small to leave any."""
    if count_std is None or noise_multiplier == 0:
        return noise_multiplier
    rest = noise_multiplier**-2 - (count_std / COUNT_SENSITIVITY) ** -2
    if rest <= 0:
        raise ValueError(
            f"the count noise {count_std:g} must exceed the noise multiplier "
            f"({noise_multiplier * COUNT_SENSITIVITY:g}) to leave noise for the updates"
        )
    return float(rest**-0.5)


def round_noise_multiplier(update_multiplier: float, count_std: float | None) -> float:
    """The multiplier of the one Gaussian mechanism a central round releases: the
    updates' (``update_multiplier``), composed with the count's (``count_std`` over
    :data:`COUNT_SENSITIVITY`) under adaptive clipping."""
    if count_std is None:
        return update_multiplier
    return combined_multiplier([update_multiplier, count_std / COUNT_SENSITIVITY])


def count_noise_std(sites: int, count_noise_multiplier: float | None) -> float:
    """The standard deviation of the noise on the count of unclipped updates: the
    plan's value, or ``sites / 20`` (Andrew et al.'s choice)."""
    return count_noise_multiplier if count_noise_multiplier is not None else sites / 20


def next_clip(clip: float, unclipped_fraction: float, *, target: float, lr: float) -> float:
    """The geometric update of the clipping bound towards the ``target`` quantile."""
    return float(clip * math.exp(-lr * (unclipped_fraction - target)))


def epsilon(
    noise_multipliers: Iterable[float], delta: float, accountant: Accountant = Accountant.RDP
) -> float:
    """The epsilon at ``delta`` of the Gaussian mechanisms of ``noise_multipliers``
    composed, by ``accountant`` (:mod:`fedloom.privacy.accounting`). No amplification by
    sampling is claimed: which sites take part in a round is derived from the plan's
    seed, which is no secret. A multiplier of 0 is no privacy at all: infinity."""
    return gaussian_epsilon(noise_multipliers, delta, accountant)
