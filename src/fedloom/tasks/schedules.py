"""The learning rate across a federation's rounds (the plan's ``training.schedule``).

A schedule is a pure function of the round and the plan's number of rounds: round
``r`` of ``R`` trains with ``lr * factor(schedule, r, R)``. The factor is 1 in round 1
and never reaches 0, so the last round still trains. Within a round the rate stays
constant: a site's local epochs are short next to the whole federation, and a rate that
depends only on the round is the same at every site, whatever its data size.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")


def factor(schedule: str, round: int, total_rounds: int) -> float:
    """What the plan's ``lr`` is multiplied by in ``round`` (1-based) of ``total_rounds``.

    - ``constant``: 1;
    - ``cosine``: ``(1 + cos(pi * (r - 1) / R)) / 2``, from 1 down towards 0;
    - ``linear``: ``1 - (r - 1) / R``, from 1 down to ``1 / R``.

    Outside the rounds (``round`` 0, as in the centralised baseline) or when the number
    of rounds is not known (``total_rounds`` 0), the factor is 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "constant" or round < 1 or total_rounds < 1:
        return 1.0
    progress = (min(round, total_rounds) - 1) / total_rounds  # in [0, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def learning_rate(lr: float, schedule: str, round: int, total_rounds: int) -> float:
    """The learning rate of ``round``: ``lr * factor(schedule, round, total_rounds)``."""
    return lr * factor(schedule, round, total_rounds)
