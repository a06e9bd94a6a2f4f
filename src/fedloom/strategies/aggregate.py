"""Aggregation maths as pure functions over weights.

No I/O, no logging, no config objects. Every function reads its inputs as float64,
returns new float64 arrays and never modifies what it was given. Strategies call these
and cast the result back to the global model's dtypes with
:func:`fedloom.core.weights.apply_delta`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedloom.core.errors import AggregationError
from fedloom.core.weights import Weights, shapes_of


def check_same_layout(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> None:
    """Raise :class:`AggregationError` unless ``update`` has ``reference``'s names and shapes."""
    if list(update) != list(reference):
        raise AggregationError(
            f"an update holds tensors {list(update)}, expected {list(reference)}",
            hint="every update must hold the global model's tensors, in the same order",
        )
    shapes = shapes_of(update)  # no lazily computed tensor is computed for this
    for name, ref in reference.items():
        if shapes[name] != np.shape(ref):
            raise AggregationError(
                f"tensor {name!r} has shape {shapes[name]}, expected {np.shape(ref)}"
            )


def _stacked(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each tensor's updates stacked on a new first axis, as float64."""
    if not updates:
        raise AggregationError("nothing to aggregate: no updates were given")
    first = updates[0]
    for update in updates[1:]:
        check_same_layout(update, first)
    return {
        name: np.stack([np.asarray(u[name], dtype=np.float64) for u in updates]) for name in first
    }


def _flattened(updates: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """An ``(n, d)`` float64 matrix: each row one update, all its tensors concatenated."""
    stacked = _stacked(updates)
    n = len(updates)
    columns = [s.reshape(n, -1) for s in stacked.values()]
    if not columns:
        return np.zeros((n, 0), dtype=np.float64)
    return np.concatenate(columns, axis=1)


def weighted_mean(updates: Sequence[Weights], weights: Sequence[float]) -> Weights:
    """``sum_i weights[i] * updates[i] / sum_i weights[i]``, tensor by tensor.

    Weights must be finite, non-negative and sum to more than zero; only their ratios
    matter.
    """
    if not updates:
        raise AggregationError("nothing to aggregate: no updates were given")
    share = _aggregation_shares(weights, len(updates))
    stacked = _stacked(updates)
    return {name: np.tensordot(share, s, axes=1) for name, s in stacked.items()}


def coordinate_median(updates: Sequence[Weights]) -> Weights:
    """The median of every coordinate across updates (mean of the two middle values
    when the count is even)."""
    return {name: np.median(s, axis=0) for name, s in _stacked(updates).items()}


def trimmed_mean(updates: Sequence[Weights], trim_fraction: float) -> Weights:
    """Per coordinate, drop the ``floor(trim_fraction * n)`` smallest and largest values
    and average the rest. Raises :class:`AggregationError` if nothing would remain."""
    n = len(updates)
    if not 0 <= trim_fraction < 1:
        raise AggregationError(f"trim_fraction must be in [0, 1), got {trim_fraction}")
    k = math.floor(trim_fraction * n)
    if n - 2 * k < 1:
        raise AggregationError(
            f"trimming {k} values from each end of {n} updates leaves nothing to average",
            hint="lower trim_fraction or wait for more sites",
        )
    return {
        name: np.sort(s, axis=0)[k : n - k].mean(axis=0) for name, s in _stacked(updates).items()
    }


def _check_krum(n: int, num_byzantine: int) -> None:
    if num_byzantine < 0:
        raise AggregationError(f"num_byzantine must be >= 0, got {num_byzantine}")
    if n <= 2 * num_byzantine + 2:
        raise AggregationError(
            f"Krum needs more than 2f + 2 = {2 * num_byzantine + 2} updates to tolerate "
            f"f = {num_byzantine} Byzantine sites, got {n}",
            hint="lower num_byzantine or require more sites per round",
        )


def krum_scores(updates: Sequence[Weights], num_byzantine: int) -> np.ndarray:
    """Krum's score of every update (Blanchard et al., 2017).

    The score of update ``i`` is the sum of the squared L2 distances, over all tensors
    flattened together, to its ``n - f - 2`` nearest other updates. Requires
    ``n > 2f + 2``. Distances are computed pair by pair (not through a Gram matrix), so
    the scores are exact functions of the pair and permuting the inputs permutes them.
    """
    n = len(updates)
    if n == 0:
        raise AggregationError("nothing to aggregate: no updates were given")
    _check_krum(n, num_byzantine)
    x = _flattened(updates)
    distances = np.empty((n, n), dtype=np.float64)
    for i in range(n):
        diff = x - x[i]
        distances[i] = np.sum(diff * diff, axis=1)
    np.fill_diagonal(distances, np.inf)
    nearest = n - num_byzantine - 2
    scores: np.ndarray = np.sort(distances, axis=1)[:, :nearest].sum(axis=1)
    return scores


def multi_krum(updates: Sequence[Weights], num_byzantine: int, num_selected: int) -> list[int]:
    """Indices of the ``num_selected`` updates with the lowest Krum scores, in order of
    score (ties: lowest index first)."""
    n = len(updates)
    if n == 0:
        raise AggregationError("nothing to aggregate: no updates were given")
    _check_krum(n, num_byzantine)
    if not 1 <= num_selected <= n:
        raise AggregationError(
            f"Multi-Krum cannot select {num_selected} of {n} updates",
            hint="num_selected must be between 1 and the number of updates",
        )
    scores = krum_scores(updates, num_byzantine)
    order = np.lexsort((np.arange(n), scores))
    return [int(i) for i in order[:num_selected]]


def krum(updates: Sequence[Weights], num_byzantine: int) -> int:
    """Index of the update with the lowest Krum score (ties: lowest index)."""
    return multi_krum(updates, num_byzantine, 1)[0]


def _aggregation_shares(weights: Sequence[float] | None, n: int) -> np.ndarray:
    """``weights`` normalised to sum to 1 (None: equal shares), checked as
    :func:`weighted_mean` checks them."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != n:
        raise AggregationError(f"{n} updates but {np.size(w)} weights")
    if not np.isfinite(w).all() or (w < 0).any():
        raise AggregationError(f"aggregation weights must be finite and >= 0, got {w.tolist()}")
    total = float(w.sum())
    if not total > 0:
        raise AggregationError(
            "aggregation weights sum to zero",
            hint="at least one site must report a positive number of samples",
        )
    shares: np.ndarray = w / total
    return shares


def _unflattened(row: np.ndarray, like: Mapping[str, np.ndarray]) -> Weights:
    """``row`` cut back into tensors shaped as those of ``like``."""
    out: Weights = {}
    start = 0
    for name, a in like.items():
        size = int(np.size(a))
        out[name] = row[start : start + size].reshape(np.shape(a)).copy()
        start += size
    return out


def _distances(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The L2 distance of every row of ``x`` to ``z``, row by row (each one an exact
    function of its own row, so permuting the rows permutes the distances)."""
    diff = x - z
    distances: np.ndarray = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return distances


_COINCIDENT = 1e-9
"""Relative to the updates' median distance to ``z``: closer than this is ``z`` itself."""


def geometric_median(
    updates: Sequence[Weights],
    weights: Sequence[float] | None = None,
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
) -> Weights:
    """The (weighted) geometric median of the updates, all tensors flattened together:
    the point ``z`` minimising ``sum_i a_i ||z - x_i||``, the robust aggregate of RFA
    (Pillutla, Kakade, Harchaoui, 2022).

    ``a_i`` are ``weights`` normalised to sum to 1 (None: equal shares). Computed by
    Weiszfeld's algorithm from the coordinate-wise median: ``z <- sum_i b_i x_i / sum_i
    b_i`` with ``b_i = a_i / ||z - x_i||``, which never increases the objective. Where
    ``z`` is one of the updates, Vardi and Zhang's (2000) step takes over: it stops if
    ``z`` is the median, and otherwise moves on (plain Weiszfeld, and RFA's smoothed
    version, stall there). It stops after ``max_iterations`` steps, or after a step that
    moved ``z`` by at most ``tolerance`` times the median distance of the updates to it:
    a test of scale that far-off updates cannot blunt.

    Its breakdown point is 1/2: if at most ``alpha n`` of ``n`` equally weighted updates
    (``alpha < 1/2``) lie farther than ``r`` from some point ``c``, however far, the
    geometric median is within ``(1 - alpha) / sqrt(1 - 2 alpha) * r`` of ``c``
    (Minsker, 2015, Lemma 2.1). It needs no count of bad updates.
    """
    if not updates:
        raise AggregationError("nothing to aggregate: no updates were given")
    if not tolerance >= 0 or max_iterations < 0:
        raise AggregationError(
            f"geometric median: tolerance must be >= 0 and max_iterations >= 0, "
            f"got {tolerance} and {max_iterations}"
        )
    shares = _aggregation_shares(weights, len(updates))
    x = _flattened(updates)
    kept = shares > 0  # an update of weight zero takes no part
    x, shares = x[kept], shares[kept]
    z = np.median(x, axis=0)
    for _ in range(max_iterations):
        distances = _distances(x, z)
        # an update within a hair of z counts as at z: its pull 1/||z - x_i|| would pin z
        # next to it (Weiszfeld's stall) where Vardi and Zhang's step moves on
        apart = distances > _COINCIDENT * float(np.median(distances))
        if not apart.any():  # every update is z
            break
        inverse = shares[apart] / distances[apart]
        moved_to = (inverse / inverse.sum()) @ x[apart]
        at_z = float(shares[~apart].sum())  # the weight of the updates equal to z
        if at_z > 0:  # Vardi and Zhang: the pull of the others against the weight at z
            pull = float(np.linalg.norm(inverse @ (x[apart] - z)))
            if pull <= at_z:
                break  # z is the geometric median
            share = at_z / pull
            moved_to = (1 - share) * moved_to + share * z
        step = float(np.linalg.norm(moved_to - z))
        z = moved_to
        if step <= tolerance * float(np.median(distances)):
            break
    return _unflattened(z, updates[0])


def near_centre(updates: Sequence[Weights], centre: Weights, radius: float) -> list[int]:
    """Indices, in order, of the updates within ``radius`` times the median distance of
    all the updates to ``centre`` (L2, all tensors flattened together).

    The rejection rule of a *skipped mean* (Hampel, 1985), around a robust centre: with
    fewer than half the updates bad, the median distance is at most the largest distance
    of a good update, so an update far beyond the others is left out however far it goes,
    and one kept is at most ``radius`` median distances from ``centre``. Needs
    ``radius >= 1``, so that at least half the updates are kept.
    """
    if not radius >= 1 or not math.isfinite(radius):
        raise AggregationError(f"radius must be finite and >= 1, got {radius}")
    x = _flattened(updates)
    check_same_layout(centre, updates[0])
    distances = _distances(x, _flattened([centre])[0])
    limit = radius * float(np.median(distances))
    return [int(i) for i in np.flatnonzero(distances <= limit)]


# Server optimisers (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).
#
# ``delta`` is the round's aggregated update Delta_t = mean(w_local - w_global), i.e. the
# negative of the pseudo-gradient: the server moves *along* it. No bias correction is
# applied, as in the paper; instead v starts at tau**2 and m at zero (see
# :func:`initial_moments`).


def _f64(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.asarray(a, dtype=np.float64) for name, a in values.items()}


def initial_moments(weights: Mapping[str, np.ndarray], tau: float) -> tuple[Weights, Weights]:
    """``(m, v)`` before round 1: m = 0 and v = tau**2 (Reddi's choice), in float64."""
    m = {name: np.zeros(np.shape(a), dtype=np.float64) for name, a in weights.items()}
    v = {name: np.full(np.shape(a), tau * tau, dtype=np.float64) for name, a in weights.items()}
    return m, v


def fedavgm_step(
    momentum: Weights, delta: Weights, *, momentum_coef: float, server_lr: float
) -> tuple[Weights, Weights]:
    """FedAvgM (Hsu et al., 2019): ``m' = momentum_coef * m + delta``.

    Returns ``(m', server_lr * m')``: the new momentum buffer and the server update.
    """
    check_same_layout(delta, momentum)
    mom = _f64(momentum)
    d = _f64(delta)
    new = {name: momentum_coef * mom[name] + d[name] for name in mom}
    return new, {name: server_lr * a for name, a in new.items()}


def _first_moment(m: Weights, delta: Weights, beta1: float) -> tuple[Weights, Weights]:
    check_same_layout(delta, m)
    d = _f64(delta)
    return {name: beta1 * a + (1.0 - beta1) * d[name] for name, a in _f64(m).items()}, d


def adam_moments(
    m: Weights, v: Weights, delta: Weights, *, beta1: float, beta2: float
) -> tuple[Weights, Weights]:
    """FedAdam: ``m' = b1 m + (1 - b1) d`` and ``v' = b2 v + (1 - b2) d**2``."""
    new_m, d = _first_moment(m, delta, beta1)
    new_v = {name: beta2 * a + (1.0 - beta2) * d[name] ** 2 for name, a in _f64(v).items()}
    return new_m, new_v


def yogi_moments(
    m: Weights, v: Weights, delta: Weights, *, beta1: float, beta2: float
) -> tuple[Weights, Weights]:
    """FedYogi: ``m'`` as Adam's and ``v' = v - (1 - b2) d**2 sign(v - d**2)``."""
    new_m, d = _first_moment(m, delta, beta1)
    new_v = {}
    for name, a in _f64(v).items():
        sq = d[name] ** 2
        new_v[name] = a - (1.0 - beta2) * sq * np.sign(a - sq)
    return new_m, new_v


def adagrad_moments(
    m: Weights, v: Weights, delta: Weights, *, beta1: float
) -> tuple[Weights, Weights]:
    """FedAdagrad: ``m'`` as Adam's and ``v' = v + d**2``."""
    new_m, d = _first_moment(m, delta, beta1)
    return new_m, {name: a + d[name] ** 2 for name, a in _f64(v).items()}


def adaptive_step(m: Weights, v: Weights, lr: float, tau: float) -> Weights:
    """The server update ``lr * m / (sqrt(v) + tau)`` (no bias correction)."""
    check_same_layout(v, m)
    vv = _f64(v)
    return {name: lr * a / (np.sqrt(vv[name]) + tau) for name, a in _f64(m).items()}
