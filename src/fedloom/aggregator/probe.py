"""A per-round contribution proxy the aggregator computes from what it legitimately
sees: how each site's update agrees with the federation's last step.

With the plan's ``evaluation.contributions`` on (and neither secure aggregation nor DP,
which make a single site's update unseen or a further release), the aggregator keeps
the previous round's step ``s = w_r - w_(r-1)`` (the model's float tensors, in their
own dtype) and, as each site's update streams in, folds ``<d_i, s>`` and ``|d_i|^2``
chunk by chunk: O(chunk) work per chunk, nothing of the update kept. A round's result
then carries ``update_cosine`` (the cosine of ``d_i`` and ``s``: 1 moves with the
federation, 0 orthogonal to it, negative against it) and ``update_norm`` (``|d_i|``).
The first round has no previous step, so no cosine (nor the first round after a
restart). This is in the spirit of gradient-alignment rewards (Xu et al., 2021,
"Gradient-Driven Rewards to Guarantee Fairness in Collaborative Machine Learning"),
made cheap and streaming by comparing with the last step instead of this round's mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedloom.accumulate import Contribution
from fedloom.core.weights import Weights, is_float
from fedloom.strategies.scaffold import model_part


@dataclass(frozen=True)
class Step:
    """The federation's last step: tensor number -> its values, flat; and its norm."""

    values: Mapping[int, np.ndarray]
    norm: float


def last_step(before: Weights, after: Weights) -> Step:
    """The step between two global models, tensor number by number (float tensors
    only, flat, in their own dtype; what SCAFFOLD keeps inside the model left out)."""
    before, after = model_part(before), model_part(after)
    out: dict[int, np.ndarray] = {}
    for index, (name, old) in enumerate(before.items()):
        new = after.get(name)
        if new is None or not is_float(old.dtype) or new.shape != old.shape:
            continue
        out[index] = (np.asarray(new) - np.asarray(old)).reshape(-1)
    norm = math.sqrt(sum(float(np.dot(a, a.astype(np.float64))) for a in out.values()))
    return Step(out, norm)


class ProbingContribution(Contribution):
    """Passes every chunk to ``inner`` (the accumulator's contribution) and folds its
    dot product with the reference and its squared norm."""

    def __init__(self, inner: Contribution, reference: Step) -> None:
        super().__init__(inner.specs, inner.site, inner.sample_weight)
        self._inner = inner
        self._reference = reference
        self.dot = 0.0
        self.squares = 0.0

    def _take(self, tensor: int, offset: int, raw: memoryview, values: np.ndarray) -> None:
        self._inner.add(tensor, offset, raw)
        step = self._reference.values.get(tensor)
        if step is None:
            return
        x = values.astype(np.float64)
        start = offset // values.itemsize
        self.dot += float(np.dot(x, step[start : start + len(x)]))
        self.squares += float(np.dot(x, x))

    def _commit(self) -> None:
        self._inner.finish()

    def _undo(self) -> None:
        self._inner.abort(self._ended or "the update was abandoned")

    def metrics(self) -> dict[str, float]:
        """``update_cosine`` and ``update_norm`` of the whole update."""
        norm, step = math.sqrt(self.squares), self._reference.norm
        out = {"update_norm": norm}
        if norm > 0 and step > 0:
            out["update_cosine"] = max(-1.0, min(1.0, self.dot / (norm * step)))
        return out
