"""Accountants: how the noise a federation released becomes (epsilon, delta), as pure
functions. The plan's ``privacy.accountant`` picks one, for every epsilon of the run:

- :attr:`~fedloom.core.records.Accountant.RDP`: Rényi DP (Mironov, 2017), composed
  additively and converted to (epsilon, delta). An upper bound, a few percent to tens of
  percent above the truth; the default, since plans written before the choice existed
  keep the epsilons (and so the budget stops) they were approved with.
- :attr:`~fedloom.core.records.Accountant.PLD`: privacy loss distributions (Koskela et al.,
  2020; Doroshenko et al., 2022), which compose exactly.

DP-FedAvg releases Gaussian mechanisms without sampling (which sites take part is
public). The privacy loss of a Gaussian mechanism of multiplier ``z`` (noise standard
deviation over sensitivity) is itself Gaussian, ``N(1 / (2 z^2), 1 / z^2)``, and a sum of
independent Gaussians is Gaussian: ``k`` such mechanisms compose **exactly** to one of
multiplier ``(sum z_i^-2)^-1/2`` (:func:`combined_multiplier`). Its PLD is that one
mechanism's, whose epsilon at ``delta`` has a closed form (Balle and Wang, 2018, the
"analytic Gaussian mechanism"); :func:`gaussian_epsilon` takes it from dp-accounting's
``gaussian_mechanism``, which is what dp-accounting's ``PLDAccountant`` computes up to
its discretisation (its pessimistic estimate lies a hair above: within 1e-6 relative in
the settings the tests check; it takes seconds where this takes a millisecond).

DP-SGD's steps are Poisson-subsampled Gaussian mechanisms, with no such closed form:
:func:`fedloom.tasks.dp_sgd.epsilon` composes them with ``PLDAccountant`` itself.

dp-accounting is imported when an epsilon is computed, not before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from fedloom.core.records import Accountant


def label(accountant: Accountant) -> str:
    """How an accountant is named to a person: ``RDP``, ``PLD``."""
    return accountant.value.upper()


def combined_multiplier(noise_multipliers: Iterable[float]) -> float:
    """The multiplier of the one Gaussian mechanism that Gaussian mechanisms of these
    multipliers (each its noise's standard deviation over its sensitivity) compose to,
    exactly: ``(sum z_i^-2)^-1/2``. 0 when any is 0 (no privacy); infinity for none."""
    zs = [float(z) for z in noise_multipliers]
    if any(z <= 0 for z in zs):
        return 0.0
    precision = sum(z**-2 for z in zs)
    return math.inf if precision == 0 else precision**-0.5


def gaussian_epsilon(
    noise_multipliers: Iterable[float], delta: float, accountant: Accountant
) -> float:
    """The epsilon at ``delta`` of the Gaussian mechanisms of ``noise_multipliers``
    composed (no sampling). 0 for none; infinity when a multiplier is 0."""
    zs = [float(z) for z in noise_multipliers]
    if not zs:
        return 0.0
    if any(z <= 0 for z in zs):
        return math.inf
    if accountant is Accountant.PLD:
        from dp_accounting.gaussian_mechanism import get_epsilon_gaussian

        return float(get_epsilon_gaussian(combined_multiplier(zs), delta))
    from dp_accounting import dp_event, rdp

    counts: dict[float, int] = {}
    for z in zs:
        counts[z] = counts.get(z, 0) + 1
    rdp_accountant = rdp.RdpAccountant()
    for z, n in sorted(counts.items()):
        rdp_accountant.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), n))
    return float(rdp_accountant.get_epsilon(delta))
